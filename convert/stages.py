"""Where calibration's time goes: seconds per stage of each decoder layer, for ``--progress`` and the benches.

The stages: ``read`` (the layer from the checkpoint onto the device, and back to ``meta``), ``forward`` (the
layer's passes over the calibration blocks, the hooks' own work aside), ``moments`` (the input moments),
``fits`` (the merge's fits and the write-back into the running model), ``refit`` (the O refit's moments and
solve; its pass over the blocks counts as forward), ``local`` (the local steps) and ``write`` (the converted
tensors to the spill). On CUDA the device is synchronized at each boundary, so that asynchronous kernels are
counted where they run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

STAGES = ("read", "forward", "moments", "fits", "refit", "local", "write")


class Stages:
    """Seconds per stage, for the current layer and over all layers.

    Args:
        device: where the layers run (CUDA is synchronized at each stage boundary).
    """

    def __init__(self, device: Any = None):
        self.device = device
        self.layer = dict.fromkeys(STAGES, 0.0)
        self.total = dict.fromkeys(STAGES, 0.0)
        self._inner = 0.0  # seconds of nested stages (hooks inside a forward pass), taken out of the outer one
        self._depth = 0

    def _sync(self) -> None:
        if self.device is not None and getattr(self.device, "type", None) == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the seconds of the ``with`` body to ``stage``; a stage timed inside another counts to itself
        alone (e.g. the moments inside a forward pass)."""
        self._sync()
        started, inner_before = time.perf_counter(), self._inner
        self._depth += 1
        try:
            yield
        finally:
            self._sync()
            self._depth -= 1
            elapsed = time.perf_counter() - started
            nested = self._inner - inner_before
            self.layer[stage] += elapsed - nested
            self._inner = inner_before + elapsed if self._depth else 0.0

    def end_layer(self) -> str:
        """The current layer's stages as one line (``read 0.1 s, forward 2.0 s, ...``); starts the next layer."""
        line = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.layer.items() if seconds >= 0.05)
        for name, seconds in self.layer.items():
            self.total[name] += seconds
        self.layer = dict.fromkeys(STAGES, 0.0)
        return line or "no stage over 0.05 s"
