"""``python -m uptrain RECIPE.yaml [section.key=value ...]`` (also under ``accelerate launch -m uptrain``)."""

import argparse
import os
import sys
from pathlib import Path

from uptrain.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uptrain", description="Uptrain a converted checkpoint.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.seq_len=1024")
    args = parser.parse_args(argv)
    from uptrain.train import TrainingError, format_summary, run

    recipe = None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        summary = run(recipe)
    except KeyboardInterrupt:  # Ctrl-C; under accelerate launch every process gets it, process 0 says so
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_line(recipe, args.recipe, args.overrides), file=sys.stderr)
        return 130
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only or full output filesystem, denied permission, a file that vanished
        from kvshrink.errors import os_error_line

        print(os_error_line(exc), file=sys.stderr)
        return 2
    if summary.get("final"):
        print(format_summary(summary))
    return 0


def interrupted_line(recipe, recipe_path: str, overrides: list[str]) -> str:
    """The one line a Ctrl-C ends with: the last complete checkpoint and the command that resumes from it."""
    if recipe is None:
        return "error: interrupted"
    from uptrain.checkpoints import newest

    last = newest(Path(recipe.output_dir))
    if last is None:
        return f"error: interrupted before the first checkpoint; start again with: {_command(recipe_path, overrides)}"
    again = list(overrides) + ([] if recipe.resume == "auto" else ["resume=auto"])
    return f"error: interrupted; the last complete checkpoint is {last}; resume with: {_command(recipe_path, again)}"


def _command(recipe_path: str, overrides: list[str]) -> str:
    import shlex

    return shlex.join(["python", "-m", "uptrain", recipe_path, *overrides])


if __name__ == "__main__":
    sys.exit(main())
