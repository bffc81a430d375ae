"""The tensor operations of a conversion: one layer's projections in head form, and the K norms.

The planner (``convert.plan``) decides which tensors change; these functions compute them at write time.
torch is imported on the first call, so planning and the byte copies that precede it run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from convert import layouts
from convert.head_form import LayerHeads
from convert.merge import METHODS

if TYPE_CHECKING:
    import torch


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
    fused = ("qkv", "weight") in loaded

    def per_head(role: str, param: str, count: int) -> torch.Tensor:
        t = loaded[role, param]
        return t.reshape(count, head_dim, *t.shape[1:])  # (count, d, *rest)

    def of(param: str) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if fused:
            return layouts.split(layout, loaded["qkv", param], heads, kv_heads, head_dim)
        q = per_head("q", param, heads) if ("q", param) in loaded else None
        return q, per_head("k", param, kv_heads), per_head("v", param, kv_heads)

    q, k, v = of("weight")  # (H, d, in), (G, d, in), (G, d, in)
    has_bias = ("qkv" if fused else "k", "bias") in loaded
    if has_bias:
        q_bias, k_bias, v_bias = of("bias")
        k, v = _bias_column(k, k_bias), _bias_column(v, v_bias)
        q = None if q is None else _bias_column(q, q_bias)
    o = loaded.get(("o", "weight"))
    o = None if o is None else o.reshape(o.shape[0], heads, head_dim)  # (out, H, d)
    return LayerHeads(q, k, v, o), has_bias


def _bias_column(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, d, in) weights and their (n, d) biases -> (n, d, in + 1): the bias as a last input column."""
    import torch

    if bias is None:
        raise ValueError("a projection has a bias for K but none for Q")
    return torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def _part(heads: torch.Tensor, param: str, has_bias: bool) -> torch.Tensor:
    """A head-form projection's ``weight`` (n, d, in) or ``bias`` (n, d), in float32."""
    heads = heads.float()
    if param == "bias":
        return heads[..., -1]
    return heads[..., :-1] if has_bias else heads


def from_heads(
    layer: LayerHeads, has_bias: bool, fused_layout: str | None, wanted: Callable[[str], bool]
) -> dict[tuple[str, str], torch.Tensor]:
    """Inverse of ``to_heads`` for the roles ``wanted`` (``qkv`` when ``fused_layout`` is set), in float32."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    if wanted("o"):
        o = layer.loaded("o").float()
        out["o", "weight"] = o.reshape(o.shape[0], -1)  # (out, H*d)
    for param in ("weight", "bias") if has_bias else ("weight",):
        if fused_layout:
            q, k, v = (_part(t, param, has_bias) for t in (layer.loaded("q"), layer.k, layer.v))
            out["qkv", param] = layouts.join(fused_layout, q, k, v)
            continue
        for role in ("q", "k", "v"):
            if wanted(role):
                t = _part(layer.loaded(role), param, has_bias)
                out[role, param] = t.reshape(-1, *t.shape[2:])
    return out
