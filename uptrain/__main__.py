"""``python -m uptrain RECIPE.yaml [section.key=value ...]`` (also under ``accelerate launch -m uptrain``)."""

import os
import shlex
import sys
from pathlib import Path

from kvshrink_base.errors import OneLineParser, check_output_dir, run_cli
from uptrain.checkpoints import newest
from uptrain.errors import RecipeError
from uptrain.plan import dry_run
from uptrain.recipe import Recipe, load_recipe
from uptrain.train import check_paths, run


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit code (2: bad input, 1: the run stopped, 130: interrupted)."""
    parser = OneLineParser(prog="python -m uptrain", description="Uptrain a converted checkpoint.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.seq_len=1024")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the recipe and print its peak-memory plan per device, then stop"
    )
    parser.add_argument(
        "--teacher-only",
        action="store_true",
        help="with distill.mode: offline, compute the teacher files (OUTPUT_DIR/teacher), then stop",
    )
    args = parser.parse_args(argv)
    loaded: list[Recipe] = []  # the recipe, once it has loaded: Ctrl-C's line names its checkpoints

    def body() -> int:
        loaded.append(load_recipe(args.recipe, args.overrides))
        check_output_dir(Path(loaded[0].output_dir), "output_dir")
        if args.dry_run:
            check_paths(loaded[0])
            if os.environ.get("RANK", "0") == "0":
                print(f"{args.recipe}: the recipe is valid; peak memory per device:\n{dry_run(loaded[0]).table()}")
            return 0
        if args.teacher_only and loaded[0].distill.mode != "offline":
            raise RecipeError("--teacher-only needs distill.mode: offline")
        summary = run(loaded[0], teacher_only=args.teacher_only)
        if summary is None:
            print(f"teacher files: {Path(loaded[0].output_dir) / 'teacher'}")
        elif summary.final:  # the main process
            print(summary.format())
        return 0

    def interrupted() -> str | None:  # under accelerate launch every process gets Ctrl-C; process 0 says so
        if os.environ.get("RANK", "0") != "0":
            return None
        return interrupted_line(loaded[0] if loaded else None, args.recipe, args.overrides).removeprefix("error: ")

    return run_cli(body, interrupted)


def interrupted_line(recipe: Recipe | None, recipe_path: str, overrides: list[str]) -> str:
    """The one line a Ctrl-C ends with: the last complete checkpoint and the command that resumes from it."""
    if recipe is None:
        return "error: interrupted"
    last = newest(Path(recipe.output_dir))
    if last is None:
        return f"error: interrupted before the first checkpoint; start again with: {_command(recipe_path, overrides)}"
    again = list(overrides) + ([] if recipe.resume == "auto" else ["resume=auto"])
    return f"error: interrupted; the last complete checkpoint is {last}; resume with: {_command(recipe_path, again)}"


def _command(recipe_path: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "uptrain", recipe_path, *overrides])


if __name__ == "__main__":
    sys.exit(main())
