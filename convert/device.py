"""Where calibration runs, in which dtype, where its hidden states live, and how much memory it needs.

The fastest device present is chosen (CUDA, then Apple's MPS, else the CPU) unless ``--device`` names one.
On an accelerator a decoder layer runs in the source's dtype; on the CPU in float32. Moments and the
least-squares solves are float64 on the CPU either way (MPS has no float64).

Memory, whatever the depth of the model (``estimate``): the larger of the start (the embeddings, which make
the first layer's inputs and are then released) and the walk:

    one decoder layer + tokens x hidden x bytes x k + 2 x (hidden + 1)² x 8 + A x 24

with ``bytes`` those of the run dtype, k the copies of the calibration hidden states held at once: 2 (a
layer's inputs and outputs), plus 2 with local steps (the original attention module's inputs and outputs),
plus heads x head_dim / hidden with the O refit (the original heads' outputs); and A the elements of a layer's
attention projections, fitted in float64 (the loaded heads, their whitened and their fitted copies; local
steps then train float32 copies with Adam: 16 bytes each, less than the fit). The Python runtime comes on top. The hidden states stay on the
accelerator while they fit in half its free memory; else they wait in (pinned) CPU memory and move a block at
a time.
"""

from __future__ import annotations

from dataclasses import dataclass



def run_dtype(device, source_dtype):
    """The dtype a layer runs in: the source's floating dtype on an accelerator, float32 on the CPU."""
    import torch

    if device.type == "cpu" or not source_dtype.is_floating_point:
        return torch.float32
    if device.type == "mps" and source_dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.float16
    return source_dtype


def free_bytes(device) -> int:
    """Free memory where tensors of ``device`` live (the accelerator's, or the machine's available RAM)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return available_ram()


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    import os

    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hidden_on_device(device, needed: int, limit: int | None = None) -> bool:
    """Whether the calibration hidden states stay on ``device`` (else they wait on the CPU, moved per block).

    ``limit`` replaces the free memory measured (tests force the offload with a tiny one).
    """
    free = free_bytes(device) if limit is None else limit
    return needed <= free // 2


@dataclass
class MemoryEstimate:
    """Calibration's peak memory, by part (bytes)."""

    device: str
    dtype: str
    layer: int
    resident: int
    hidden: int
    copies: float
    moments: int
    fit: int

    @property
    def total(self) -> int:
        walk = self.layer + self.hidden * self.copies + self.moments + self.fit
        return int(max(self.resident + self.hidden, walk))

    def line(self) -> str:
        gb = 1e9
        return (f"{self.total / gb:.2f} GB on {self.device} ({self.dtype}): the larger of embeddings "
                f"{self.resident / gb:.2f} and one layer {self.layer / gb:.2f} + hidden states {self.hidden / gb:.3f} "
                f"x {self.copies:g} + moments {self.moments / gb:.3f} + fit {self.fit / gb:.2f}")


def estimate(layer_elements: int, resident_elements: int, attention_elements: int, tokens: int, dims, device, dtype,
             *, refit_o: bool, local_steps: int) -> MemoryEstimate:
    """The formula in this module's docstring for a model's sizes and the calibration settings."""
    size = dtype.itemsize
    copies = 2 + (2 if local_steps else 0) + (dims.heads * dims.head_dim / dims.hidden if refit_o else 0)
    return MemoryEstimate(str(device), str(dtype).removeprefix("torch."), layer_elements * size,
                          resident_elements * size, tokens * dims.hidden * size, copies,
                          2 * (dims.hidden + 1) ** 2 * 8, attention_elements * 24)
