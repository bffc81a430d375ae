"""One error base for every command, and the one boundary that turns errors into one line and an exit code.

Every CLI of the project runs its body through ``run_cli``: a ``KvshrinkError`` (bad input, an impossible
request) prints ``error: ...`` and exits with its ``exit_code`` (2); an OSError (read-only or full filesystem,
denied permission, a file that vanished) prints ``error: PATH: cause`` and exits with 2; Ctrl-C exits with 130.
No traceback reaches a user. ``OneLineParser`` and ``positive_int`` give argument errors the same one line;
``check_output_dir`` refuses an output directory that cannot be made before a command creates anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class KvshrinkError(Exception):
    """Bad input or an impossible request: printed on one line, exit code ``exit_code``."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what a one-line error quotes."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def os_error_line(exc: OSError) -> str:
    """``error: PATH: cause`` for a read-only or full filesystem, a denied permission, a vanished file."""
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"error: {where}: {cause}" if where else f"error: {cause}"


def run_cli(body: Callable[[], int | None], interrupted: str | Callable[[], str | None] = "interrupted") -> int:
    """Run a command's body and return its exit code; errors become one line on stderr.

    Args:
        body: the command; returns its exit code (None: 0).
        interrupted: the line printed after ``error: `` on Ctrl-C (say what was kept and how to resume), or a
            function that makes it when it happens (None: print nothing, as on all but one of several processes).
    """
    try:
        return body() or 0
    except KvshrinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(os_error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        line = interrupted() if callable(interrupted) else interrupted
        if line is not None:
            print(f"error: {line}", file=sys.stderr)
        return 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: ...``, exit code 2, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts: 0, negatives and non-integers are refused at parsing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_output_dir(out: Path, flag: str) -> None:
    """``out`` must be a directory, or a path where one can be made (parents included).

    Commands call this before they create anything, so a bad ``--out`` leaves nothing behind.

    Raises:
        KvshrinkError: ``out`` is a file, lies below a file, or below a directory that cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise KvshrinkError(f"{flag} {out} is a file; give a directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise KvshrinkError(f"{flag} {out}: {existing} is a file, so no directory can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KvshrinkError(f"{flag} {out}: {existing} is not writable")
