"""The one device chooser of the project: every command that computes picks its device here.

``auto`` is the fastest device present: CUDA, then Apple's MPS, else the CPU. A named device (``cpu``,
``cuda``, ``cuda:N``, ``mps``) must be present; anything else is one line (``DeviceError``, exit 2).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kvshrink_base.errors import KvshrinkError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DEVICE_HELP = "where it runs: auto (CUDA, then MPS, else the CPU), cpu, cuda, cuda:N, mps (default: auto)"
_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DeviceError(KvshrinkError):
    """A device that is not one, or is not present here: one line, exit code 2."""


def valid_name(name: object) -> bool:
    """Whether ``name`` is a device name the choosers accept (auto, cpu, cuda, cuda:N, mps), present or not."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def _has_mps() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(name: str | None = "auto") -> torch.device:
    """The device named, checked to be present; ``auto`` (or None): CUDA, then MPS, then the CPU.

    Raises:
        DeviceError: ``name`` is not a device, or it is absent here.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _has_mps() else "cpu")
    if not valid_name(name):
        raise DeviceError(f"--device {name!r} is not a device; use {DEVICE_CHOICES}")
    device = torch.device(name)
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _has_mps()}[device.type]
    if device.type == "cuda" and present and device.index is not None:
        present = device.index < torch.cuda.device_count()
    if not present:
        raise DeviceError(f"--device {name}: no such device here; use --device auto (the fastest present) or cpu")
    return device
