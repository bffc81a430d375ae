"""Atomic writes: a directory or a file appears complete under its name, or not at all.

Used by the converter's output, training checkpoints and the demo's cached assets.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

# What ``signal.signal`` returns: the previous handler (a function, SIG_DFL or SIG_IGN), or None when it was not
# installed from Python.
_Handler = Callable[[int, FrameType | None], Any] | int | None


def write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half of it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicDirectory:
    """A temporary sibling of ``target`` that replaces it only when the block ends without error.

    A failure, Ctrl-C or SIGTERM removes the temporary directory; a SIGKILL leaves only a
    hidden ``.NAME.tmp-*`` sibling, never something that looks like the finished checkpoint.
    """

    def __init__(self, target: Path, temp_name: str | None = None):
        """``temp_name``: a fixed name for the temporary sibling (several processes writing one directory
        must agree on it; a stale one from a killed run is removed first)."""
        self.target = Path(target)
        self.temp_name = temp_name
        self.path: Path | None = None
        self._old_handler: _Handler = None

    def __enter__(self) -> Path:
        if self.temp_name is None:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        else:
            self.path = self.target.parent / self.temp_name
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
        try:
            self._old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            self._old_handler = None
        return self.path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.path is not None, "AtomicDirectory left without being entered"
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")
