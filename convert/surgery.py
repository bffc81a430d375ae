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


def layer_tensors(loaded: dict[tuple[str, str], torch.Tensor], rw, moment: torch.Tensor | None,
                  layer: int) -> tuple[dict[tuple[str, str], torch.Tensor], list[int]]:
    """A layer's Q/K/V/O (or fused QKV and O) tensors -> converted ones, via ``attention.rewrite_layer``.

    Rows go to head form, biases become a last input column (the input is [x, 1]), and back.
    ``rw`` is the plan's ``LayerRewrite``; ``moment`` the layer's calibration moment (hidden + 1)².
    Returns {(role, param): tensor} and the KV-head order the grouping chose.
    """
    from convert.attention import Rotary, rewrite_layer

    d, heads, kv_in = rw.dims.head_dim, rw.dims.heads, rw.dims.kv_heads
    fused = ("qkv", "weight") in loaded

    def heads_of(param: str):
        if fused:
            return layouts.split(rw.layout, loaded["qkv", param], heads, kv_in, d)
        return tuple(loaded[r, param].reshape(n, d, *loaded[r, param].shape[1:])
                     for r, n in (("q", heads), ("k", kv_in), ("v", kv_in)))

    q, k, v = heads_of("weight")  # (H, d, in), (G, d, in), (G, d, in)
    has_bias = ("qkv" if fused else "q", "bias") in loaded
    if has_bias:
        q, k, v = (torch.cat([w, b.unsqueeze(-1)], dim=-1) for w, b in zip((q, k, v), heads_of("bias")))
    o = loaded["o", "weight"]
    o = o.reshape(o.shape[0], heads, d)  # (out, H, d)
    if moment is not None and not has_bias:
        moment = moment[:-1, :-1]  # no bias: the ones column is not part of the input
    generator = torch.Generator().manual_seed(rw.seed * 1_000_003 + layer) if rw.method == "random" else None
    rot = Rotary.of(rw.rotary, d, rw.rotary_dim)
    q, k, v, o, order = rewrite_layer(q, k, v, o, kv_heads=rw.kv_heads, method=rw.method, grouping=rw.grouping,
                                      rot=rot, k_normed=rw.k_normed, moment=moment, generator=generator)
    q, k, v, o = (t.float() for t in (q, k, v, o))
    out = {("o", "weight"): o.reshape(o.shape[0], -1)}
    parts = {"weight": (q[..., :-1], k[..., :-1], v[..., :-1]) if has_bias else (q, k, v)}
    if has_bias:
        parts["bias"] = (q[..., -1], k[..., -1], v[..., -1])
    for param, (pq, pk, pv) in parts.items():
        if fused:
            out["qkv", param] = layouts.join(rw.out_layout, pq, pk, pv)
        else:
            for role, t in (("q", pq), ("k", pk), ("v", pv)):
                out[role, param] = t.reshape(-1, *t.shape[2:])
    return out, order
