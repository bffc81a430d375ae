"""The tensor operations of a conversion: one layer's projections in head form, and the K norms.

The planner (``convert.plan``) decides which tensors change; these functions compute them at write time.
torch is imported on the first call, so planning and the byte copies that precede it run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from convert import layouts
from convert.merge import METHODS

if TYPE_CHECKING:
    import torch

    from convert.fits import LayerHeads


def kv_norm(t: torch.Tensor, *, kv_heads_in: int, kv_heads: int, method: str) -> torch.Tensor:
    """A K norm spanning the KV heads: (G*d,) -> (N*d,) as olmo2, or (G, d) -> (N, d) as cohere."""
    merged = METHODS[method].pool(t.reshape(kv_heads_in, -1), kv_heads, None, is_norm=True)
    return merged if t.dim() == 2 else merged.reshape(-1)


def norm_heads(*ts: torch.Tensor, method: str) -> torch.Tensor:
    """One norm module per KV head (stablelm): a group's (d,) weights -> one (d,) weight."""
    import torch

    return METHODS[method].pool(torch.stack(ts), 1, None, is_norm=True)[0]


def layer_generator(method: str, seed: int, layer: int) -> torch.Generator | None:
    """One reproducible random stream per layer (K drawn first, then V), whatever order tensors are written in."""
    if not METHODS[method].seeded:
        return None
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def to_heads(
    loaded: dict[tuple[str, str], torch.Tensor], layout: str, heads: int, kv_heads: int, head_dim: int
) -> tuple[LayerHeads, bool]:
    """A layer's loaded {(role, param): tensor} -> head form with biases as a last input column; has it biases?

    Roles not loaded (Q and O where only K and V change) stay None.
    """
    import torch

    from convert.fits import LayerHeads

    fused = ("qkv", "weight") in loaded

    def of(param: str):
        if fused:
            return layouts.split(layout, loaded["qkv", param], heads, kv_heads, head_dim)
        return tuple(
            loaded[r, param].reshape(n, head_dim, *loaded[r, param].shape[1:]) if (r, param) in loaded else None
            for r, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))
        )

    q, k, v = of("weight")  # (H, d, in), (G, d, in), (G, d, in)
    has_bias = ("qkv" if fused else "k", "bias") in loaded
    if has_bias:
        q, k, v = (
            None if w is None else torch.cat([w, b.unsqueeze(-1)], dim=-1) for w, b in zip((q, k, v), of("bias"))
        )
    o = loaded.get(("o", "weight"))
    o = None if o is None else o.reshape(o.shape[0], heads, head_dim)  # (out, H, d)
    return LayerHeads(q, k, v, o), has_bias


def from_heads(
    layer: LayerHeads, has_bias: bool, fused_layout: str | None, wanted: Callable[[str], bool]
) -> dict[tuple[str, str], torch.Tensor]:
    """Inverse of ``to_heads`` for the roles ``wanted`` (``qkv`` when ``fused_layout`` is set), in float32."""
    q, k, v, o = (None if t is None else t.float() for t in (layer.q, layer.k, layer.v, layer.o))
    out = {("o", "weight"): o.reshape(o.shape[0], -1)} if wanted("o") else {}
    parts = {"weight": tuple(None if t is None else (t[..., :-1] if has_bias else t) for t in (q, k, v))}
    if has_bias:
        parts["bias"] = tuple(None if t is None else t[..., -1] for t in (q, k, v))
    for param, (pq, pk, pv) in parts.items():
        if fused_layout:
            out["qkv", param] = layouts.join(fused_layout, pq, pk, pv)
            continue
        for role, t in (("q", pq), ("k", pk), ("v", pv)):
            if wanted(role):
                out[role, param] = t.reshape(-1, *t.shape[2:])
    return out
