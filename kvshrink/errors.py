"""One error base for every command, and the one boundary that turns errors into one line and an exit code.

Every CLI of the project runs its body through ``run_cli``: a ``KvshrinkError`` (bad input, an impossible
request) prints ``error: ...`` and exits with its ``exit_code`` (2); an OSError (read-only or full filesystem,
denied permission, a file that vanished) prints ``error: PATH: cause`` and exits with 2; Ctrl-C exits with 130.
No traceback reaches a user.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class KvshrinkError(Exception):
    """Bad input or an impossible request: printed on one line, exit code ``exit_code``."""

    exit_code = 2


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
