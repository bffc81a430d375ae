"""``python -m uptrain RECIPE.yaml [section.key=value ...]`` (also under ``accelerate launch -m uptrain``)."""

import argparse
import sys

from uptrain.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uptrain", description="Uptrain a converted checkpoint.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.seq_len=1024")
    args = parser.parse_args(argv)
    from uptrain.train import TrainingError, format_summary, run

    try:
        summary = run(load_recipe(args.recipe, args.overrides))
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


if __name__ == "__main__":
    sys.exit(main())
