"""Row layouts of fused QKV projections, as pure split/join functions.

A projection weight is (rows, in_features) and its bias (rows,); both are cut on
dim 0. ``split`` returns per-head blocks ``q: (heads, head_dim, *rest)``,
``k, v: (kv_heads, head_dim, *rest)``; ``join`` is its inverse for any KV-head
count. With H query heads, G KV heads and g = H / G:

- ``contiguous``: [Q1 .. QH | K1 .. KG | V1 .. VG]       (phi3, gpt2, MQA falcon/bigcode)
- ``grouped``:    [q1 .. qg, k1, v1, q(g+1) .. q2g, k2, v2, ...]  (falcon new decoder)
- ``per_head``:   [q1, k1, v1, q2, k2, v2, ...]           (MHA falcon and bigcode, G = H)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a tensor is first joined: the converter plans without it
    import torch


def split(
    layout: str, fused: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a fused QKV tensor into (q, k, v) head blocks; see the module docstring."""
    rest = fused.shape[1:]
    if layout == "contiguous":
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        return (
            q.reshape(heads, head_dim, *rest),
            k.reshape(kv_heads, head_dim, *rest),
            v.reshape(kv_heads, head_dim, *rest),
        )
    if layout == "grouped":
        group = heads // kv_heads
        blocks = fused.reshape(kv_heads, group + 2, head_dim, *rest)  # (G, g + 2, d, *rest)
        q = blocks[:, :group].reshape(heads, head_dim, *rest)
        return q, blocks[:, group], blocks[:, group + 1]
    if layout == "per_head":
        if kv_heads != heads:
            raise ValueError(f"per_head layout needs one KV head per query head, got {kv_heads} for {heads}")
        blocks = fused.reshape(heads, 3, head_dim, *rest)  # (H, 3, d, *rest)
        return blocks[:, 0], blocks[:, 1], blocks[:, 2]
    raise ValueError(f"unknown fused layout {layout!r}")


def join(layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split``: head blocks back into one fused tensor in ``layout``."""
    import torch

    heads, head_dim, *rest = q.shape
    kv_heads = k.shape[0]
    if layout == "contiguous":
        return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])
    if layout == "grouped":
        q = q.reshape(kv_heads, heads // kv_heads, head_dim, *rest)
        return torch.cat([q, k.unsqueeze(1), v.unsqueeze(1)], dim=1).reshape(-1, *rest)
    if layout == "per_head":
        if kv_heads != heads:
            raise ValueError(f"per_head layout needs one KV head per query head, got {kv_heads} for {heads}")
        return torch.stack([q, k, v], dim=1).reshape(-1, *rest)
    raise ValueError(f"unknown fused layout {layout!r}")
