"""How the KV heads of one group become one head.

Groups are consecutive, as transformers' ``repeat_kv`` reads them: with G source
KV heads and N target heads, target head j pools source heads
j*G/N .. (j+1)*G/N - 1, and query head h (which read source head h // (H/G))
now reads target head h // (H/N).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the converter plans without it
    import torch

METHODS = ("mean", "first", "random", "svd")
CALIBRATED = ("svd",)  # methods that run the source model on calibration text (see convert.calibrate)
GROUPINGS = ("contiguous", "similarity")


def merge_heads(heads: torch.Tensor, kv_heads: int, method: str, generator: torch.Generator | None = None,
                is_norm: bool = False) -> torch.Tensor:
    """Pool (G, ...) per-head blocks into (kv_heads, ...), in float32.

    Args:
        heads: one block per source KV head: a projection's (G, head_dim, in) rows,
            its (G, head_dim) bias, or a K norm's (G, head_dim) weight.
        kv_heads: N, which divides G.
        method: ``mean`` (the GQA paper), ``first`` (keep each group's first head) or
            ``random`` (fresh normal init with the std of the group's source heads;
            norm weights have no such scale and are mean-pooled instead).
        generator: the random source for ``random``.
        is_norm: the blocks are norm weights.

    Returns:
        float32 tensor (kv_heads, ...).
    """
    group = heads.shape[0] // kv_heads
    grouped = heads.float().reshape(kv_heads, group, *heads.shape[1:])  # (N, G/N, ...)
    if method == "mean" or (method == "random" and is_norm):
        return grouped.mean(dim=1)
    if method == "first":
        return grouped[:, 0].clone()
    if method == "random":
        std = grouped.flatten(1).std(dim=1, correction=0)  # one scale per group
        import torch

        noise = torch.randn(grouped[:, 0].shape, generator=generator, dtype=torch.float32)
        return noise * std.reshape(kv_heads, *([1] * (heads.dim() - 1)))
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
