"""The error type the converter raises for bad input, and the one line every CLI prints for an OS error."""

from __future__ import annotations

import argparse
import os
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
