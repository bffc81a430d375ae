"""The error type the converter raises for bad input, the one line every CLI prints for an OS error or a bad
argument, and the check of an output directory that every command makes before it creates anything."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn


class ConversionError(Exception):
    """Bad input or an impossible request: the CLI prints it on one line and exits with 2."""


def os_error_line(exc: OSError) -> str:
    """``error: PATH: cause`` for a read-only or full filesystem, a denied permission, a vanished file.

    Every CLI catches OSError at its boundary and prints this instead of a traceback (exit code 2).
    """
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"error: {where}: {cause}" if where else f"error: {cause}"


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
        ConversionError: ``out`` is a file, lies below a file, or below a directory that cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{flag} {out} is a file; give a directory")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConversionError(f"{flag} {out}: {existing} is a file, so no directory can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(f"{flag} {out}: {existing} is not writable")
