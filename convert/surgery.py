"""The tensor operations of a conversion, one output tensor each (the only place that needs torch).

The engine plans each changed tensor as (operation name, source tensors, keyword arguments);
these functions carry it out at write time. All pooling happens in float32.
"""

from __future__ import annotations

import zlib

import torch

from convert import layouts
from convert.merge import merge_heads


def _generator(method: str, seed: int, name: str) -> torch.Generator | None:
    """One reproducible stream per output tensor, whatever order tensors are written in."""
    if method != "random":
        return None
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def same(t: torch.Tensor) -> torch.Tensor:
    """Unchanged values (cast or transposed on the way)."""
    return t


def kv_rows(t: torch.Tensor, *, kv_heads_in: int, kv_heads: int, head_dim: int, method: str, seed: int,
            name: str) -> torch.Tensor:
    """K or V projection rows (G*d, *rest) -> (N*d, *rest); a bias is (G*d,)."""
    rest = t.shape[1:]
    heads = t.reshape(kv_heads_in, head_dim, *rest)  # (G, d, *rest)
    merged = merge_heads(heads, kv_heads, method, _generator(method, seed, name))  # (N, d, *rest)
    return merged.reshape(kv_heads * head_dim, *rest)


def fused_qkv(t: torch.Tensor, *, layout: str, out_layout: str, heads: int, kv_heads_in: int, kv_heads: int,
              head_dim: int, method: str, seed: int, name: str) -> torch.Tensor:
    """A fused QKV weight or bias: split by `layout`, pool K and V, join in `out_layout`."""
    q, k, v = layouts.split(layout, t, heads, kv_heads_in, head_dim)
    k = merge_heads(k, kv_heads, method, _generator(method, seed, name + ":k"))
    v = merge_heads(v, kv_heads, method, _generator(method, seed, name + ":v"))
    return layouts.join(out_layout, q.float(), k, v)


def kv_norm(t: torch.Tensor, *, kv_heads_in: int, kv_heads: int, method: str, seed: int, name: str) -> torch.Tensor:
    """A K norm spanning the KV heads: (G*d,) -> (N*d,) as olmo2, or (G, d) -> (N, d) as cohere."""
    merged = merge_heads(t.reshape(kv_heads_in, -1), kv_heads, method, _generator(method, seed, name), is_norm=True)
    return merged if t.dim() == 2 else merged.reshape(-1)


def norm_heads(*ts: torch.Tensor, method: str, seed: int, name: str) -> torch.Tensor:
    """One norm module per KV head (stablelm): a group's (d,) weights -> one (d,) weight."""
    return merge_heads(torch.stack(ts), 1, method, _generator(method, seed, name), is_norm=True)[0]
