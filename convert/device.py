"""Where calibration runs, in which dtype, where its hidden states live, and how much memory it needs.

The device is chosen by ``kvshrink_base.device.pick_device`` (CUDA, then MPS, else the CPU, unless ``--device``
names one). On an accelerator a decoder layer runs in the source's dtype; on the CPU in float32. Each block's
moments are float32 where the layer runs, summed in float64 on the CPU, where the least-squares fits run.

Memory, whatever the depth of the model (``estimate``, parts in ``MemoryEstimate``): the larger of the start
(the embeddings, which make the first layer's inputs and are then released; before them, in the data-free
default, the whole model once to sample text) and the walk. The walk holds, on the device:

    one decoder layer (MoE experts included) + tokens x hidden x bytes x k + local steps

with ``bytes`` those of the run dtype and k the copies of the calibration hidden states held at once: 2 (a
layer's inputs and outputs), plus 2 with local steps (the original attention module's inputs and outputs),
plus heads x head_dim / hidden with the O refit (the original heads' outputs). The local steps train float32
copies of Q, K/V and O with Adam (16 bytes an element) over 4 blocks at a time. In CPU memory:

    the layer as read (source dtype; MoE experts once more where transformers fuses them) + 2 x (hidden + 1)² x 8
    + A x 24

the float64 moments and the fits of a layer's A attention elements (the loaded heads, whitened and fitted).
The hidden states stay on the accelerator while they fit in half its free memory; else they wait in (pinned)
CPU memory, each block's output moved there as it is made, and move to the device a block at a time. On the
CPU the two memories are one. The Python runtime comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from convert.roles import Dims


def run_dtype(device: torch.device, source_dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer runs in: the source's floating dtype on an accelerator, float32 on the CPU."""
    import torch

    if device.type == "cpu" or not source_dtype.is_floating_point:
        return torch.float32
    if device.type == "mps" and source_dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.float16
    return source_dtype


def free_bytes(device: torch.device) -> int:
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


def hidden_on_device(device: torch.device, needed: int, limit: int | None = None) -> bool:
    """Whether the calibration hidden states stay on ``device`` (else they wait on the CPU, moved per block).

    ``limit`` replaces the free memory measured (tests force the offload with a tiny one).
    """
    free = free_bytes(device) if limit is None else limit
    return needed <= free // 2


@dataclass
class MemoryEstimate:
    """Calibration's peak memory, by part (bytes), and where each part lives.

    On the device (where the layers run): one decoder layer in the run dtype, every MoE expert included; the
    hidden states x ``copies`` while they stay there (``on_device``), else a few blocks in flight; each block's
    float32 moment; the local steps' trainable copies with Adam. In CPU memory: the layer as read from the
    checkpoint (the source dtype) and, where transformers fuses the experts on loading, their fused copy; the
    float64 moments and fits; the hidden states when they wait there. The start (the embeddings and the first
    layer's inputs) and the data-free default's sampling step (the whole model in the run dtype, once, before the
    walk) come before the walk and are released. Where the device is the CPU, the two add up.
    """

    device: str
    dtype: str
    layer: int
    read: int
    resident: int
    hidden: int
    copies: float
    block: int  # one calibration block's hidden states (what is in flight when they wait in CPU memory)
    moments: int
    fit: int
    local: int
    sampling: int
    on_device: bool = True
    hidden_tokens: int = 0  # the calibration tokens ``hidden`` holds

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def device_walk(self) -> int:
        """Bytes on the device during the walk."""
        states = self.hidden * self.copies if self.on_device else self.block * 4
        return int(self.layer + states + (self.moments // 4 if not self.on_cpu else 0) + self.local)

    @property
    def cpu_walk(self) -> int:
        """Bytes of CPU memory during the walk (beyond the device's, where it is another)."""
        waiting = 0 if self.on_device else self.hidden * self.copies
        return int(self.read + waiting + self.moments + self.fit)

    @property
    def total(self) -> int:
        """The peak where everything shares one memory (the CPU), or the device's peak."""
        start = max(self.sampling, self.resident + self.hidden)
        if self.on_cpu:
            return int(max(start, self.device_walk + self.cpu_walk))
        return int(max(start, self.device_walk))

    def line(self) -> str:
        gb = 1e9
        states = (
            f"hidden states {self.hidden / gb:.3f} x {self.copies:g}"
            if self.on_device
            else f"hidden states in CPU memory ({self.hidden * self.copies / gb:.2f}), blocks in flight "
            f"{self.block * 4 / gb:.3f}"
        )
        text = (
            f"{self.total / gb:.2f} GB on {self.device} ({self.dtype}): the larger of the start "
            f"{max(self.sampling, self.resident + self.hidden) / gb:.2f} (embeddings {self.resident / gb:.2f}"
            f"{f', sampling the whole model {self.sampling / gb:.2f}' if self.sampling else ''}) and the walk: "
            f"one layer {self.layer / gb:.2f} + {states} + local steps {self.local / gb:.3f}"
        )
        cpu = f"read {self.read / gb:.2f} + moments {self.moments / gb:.3f} + fit {self.fit / gb:.2f}"
        if self.on_cpu:
            return f"{text} + {cpu}"
        return f"{text}; CPU memory {self.cpu_walk / gb:.2f} GB: {cpu}"

    def advice(self, device_free: int, cpu_free: int) -> str | None:
        """Which flags would fit this machine, where the estimate does not: None where it fits."""
        cpu_peak = 0 if self.on_cpu else self.cpu_walk
        if self.total <= device_free and cpu_peak <= cpu_free:
            return None
        hints = []
        if self.sampling > device_free:
            hints.append("--calibration-data FILE (sampling runs the whole model)")
        if not self.on_cpu and self.layer + self.local > device_free:
            hints.append("--device cpu (one layer does not fit the device)")
        states = self.hidden * self.copies
        if self.on_device or self.on_cpu:  # the states share the device's memory
            room = device_free - (self.total - states)
        else:
            room = cpu_free - (cpu_peak - states)
        tokens = int(room / states * self.hidden_tokens) if states and room > 0 else 0
        tokens = tokens // 1024 * 1024 if tokens >= 4096 else tokens
        if 0 < tokens < self.hidden_tokens:
            hints.append(f"--calibration-tokens {tokens} or fewer")
        where = f"{device_free / 1e9:.1f} GB free on {self.device}"
        if not self.on_cpu:
            where += f", {cpu_free / 1e9:.1f} GB of CPU memory"
        return f"the estimate exceeds this machine ({where}); try " + (", ".join(hints) or "a larger machine")


def estimate(
    layer_elements: int,
    resident_elements: int,
    attention_elements: int,
    tokens: int,
    dims: Dims,
    device: torch.device,
    dtype: torch.dtype,
    *,
    refit_o: bool,
    local_steps: int,
    seq_len: int = 512,
    read_bytes: int = 0,
    fused_elements: int = 0,
    sampling_bytes: int = 0,
) -> MemoryEstimate:
    """The parts in ``MemoryEstimate``'s docstring for a model's sizes and the calibration settings.

    Args:
        read_bytes: the largest layer's bytes in the checkpoint's dtype (read into CPU memory).
        fused_elements: the elements of that layer that transformers fuses on loading (MoE experts).
        sampling_bytes: the memory of sampling text from the whole model first (0: text given).
    """
    size = dtype.itemsize
    copies = 2 + (2 if local_steps else 0) + (dims.heads * dims.head_dim / dims.hidden if refit_o else 0)
    width = dims.hidden + 1
    # local steps: float32 Q, K/V, O with gradients and Adam (16 bytes each); a step's activations over 4 blocks
    # (about 8 x seq x hidden values and the heads' seq x seq scores per block, float32)
    local = (
        16 * attention_elements + 4 * 4 * (8 * seq_len * dims.hidden + dims.heads * seq_len**2) if local_steps else 0
    )
    return MemoryEstimate(
        str(device),
        str(dtype).removeprefix("torch."),
        layer_elements * size,
        read_bytes + fused_elements * size,
        resident_elements * size,
        tokens * dims.hidden * size,
        copies,
        seq_len * dims.hidden * size,
        2 * width**2 * 8,
        attention_elements * 24,
        local,
        sampling_bytes,
        hidden_tokens=tokens,
    )
