"""One layer's attention projections in head form, and which key dimensions RoPE turns together.

The types the merge methods (``convert.merge``), their fits (``convert.fits``) and the layer path
(``convert.heads``, ``convert.layers``) share; this module imports nothing else of the converter. A bias, where
the family has one, is a last input column (the input is then [x, 1]):

    q: (H, d, in)   k: (G, d, in)   v: (G, d, in)   o: (out, H, d)

Query head h reads KV head h // (H / G), as transformers' ``repeat_kv`` does. torch is imported on the first
call: the planner imports this module, and plans without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerHeads:
    """One layer's attention projections in head form (a bias is the last input column: the input is [x, 1]).

    q: (H, d, in)   k: (G, d, in)   v: (G, d, in)   o: (out, H, d)

    ``q`` and ``o`` are None where the conversion leaves them as they are (pooling K and V alone).
    """

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor | None

    def replace(self, **changes: torch.Tensor) -> LayerHeads:
        """This layer with the named projections replaced."""
        return dataclasses.replace(self, **changes)

    def loaded(self, role: str) -> torch.Tensor:
        """The projection of ``role`` (q, k, v or o), which the caller needs loaded (ValueError where it is not)."""
        tensor = {"q": self.q, "k": self.k, "v": self.v, "o": self.o}[role]
        if tensor is None:
            raise ValueError(f"this rewrite needs the layer's {role.upper()}, which was not loaded")
        return tensor


@dataclass
class Rotary:
    """Which key dimensions RoPE rotates together: pairs (a[j], b[j]); ``rest`` it leaves alone."""

    a: torch.Tensor
    b: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def of(cls, style: str, head_dim: int, rotary_dim: int) -> Rotary:
        """``half``: rotate_half pairs (j, j + r/2); ``interleaved``: (2j, 2j + 1); ``none``: no pairs."""
        import torch

        if style == "none" or rotary_dim == 0:
            return cls(torch.arange(0), torch.arange(0), torch.arange(head_dim))
        half = rotary_dim // 2
        if style == "half":
            a = torch.arange(half)
            b = a + half
        elif style == "interleaved":
            a = torch.arange(0, rotary_dim, 2)
            b = a + 1
        else:
            raise ValueError(f"unknown rotary style {style!r}")
        return cls(a, b, torch.arange(rotary_dim, head_dim))


def permute(layer: LayerHeads, order: list[int]) -> LayerHeads:
    """Reorder KV heads by ``order``, with the query heads that read each one and their O columns.

    [k0, k1, k2] with order [2, 0, 1] -> [k2, k0, k1]; query blocks [q0.. | q1.. | q2..] follow.
    The model computes the same function: heads are summed by O in any order.
    """
    import torch

    q, k, v, o = layer.loaded("q"), layer.k, layer.v, layer.loaded("o")
    heads, kv = q.shape[0], k.shape[0]
    idx = torch.tensor(order)
    reads = heads // kv
    q = q.reshape(kv, reads, *q.shape[1:])[idx].reshape(q.shape)  # (G, H/G, d, in) in the new order
    o = o.reshape(o.shape[0], kv, reads, o.shape[-1])[:, idx].reshape(o.shape)  # (out, G, H/G, d) likewise
    return LayerHeads(q, k[idx], v[idx], o)
