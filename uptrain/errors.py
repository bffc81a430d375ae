"""The uptrainer's errors, apart from the recipe so that every module (the sample command, the evaluator, the
loop) can raise them without importing the converter's option tables."""

from __future__ import annotations

from kvshrink_base.errors import KvshrinkError


class RecipeError(KvshrinkError):
    """A recipe or an evaluation setting that cannot run: printed on one line, exit code 2."""


class TrainingError(KvshrinkError):
    """The run stopped (non-finite loss, out of memory): printed on one line, exit code 1."""

    exit_code = 1
