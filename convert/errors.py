"""The converter's error: bad input or an impossible request (``kvshrink_base.errors.run_cli`` prints it, exit 2)."""

from __future__ import annotations

from kvshrink_base.errors import KvshrinkError


class ConversionError(KvshrinkError):
    """Bad input or an impossible request: the CLI prints it on one line and exits with 2."""
