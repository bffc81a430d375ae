"""The output-aware merge (``--method aware``): each value head is fitted in the norm of the O columns that carry
it, each key head in the norm of the queries that read it. Planted cases where only those fits can be exact."""

import torch

from convert.fits import svd_merge, whitener
from convert.head_form import LayerHeads, Rotary

H = G = 2  # two heads, each with its own KV head, merged into one
D, IN, T = 4, 16, 24


def attend(layer: LayerHeads, x: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention without RoPE, straight from the head-form weights. x: (T, IN) -> (T, out)."""
    reads = layer.q.shape[0] // layer.k.shape[0]
    out = 0
    for h in range(layer.q.shape[0]):
        i = h // reads
        q, k, v = x @ layer.q[h].T, x @ layer.k[i].T, x @ layer.v[i].T  # (T, D)
        scores = (q @ k.T / D**0.5).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out = out + scores.softmax(-1) @ v @ layer.o[:, h].T
    return out


def planted(which: str) -> LayerHeads:
    """Head 0 is only ever read on dims 0-1, head 1 on dims 2-3: through O (``v``) or by the queries (``k``)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, D, IN, generator=gen, dtype=torch.float64) for n in (H, G, G))
    o = torch.randn(8, H, D, generator=gen, dtype=torch.float64)
    if which == "v":
        k[1] = k[0]  # keys equal: any merge keeps the scores; only the values differ
        o[:, 0, 2:] = 0
        o[:, 1, :2] = 0
    else:
        v[1] = v[0]
        q[0, 2:] = 0
        q[1, :2] = 0
    return LayerHeads(q, k, v, o)


def merged_error(layer: LayerHeads, aware: bool, x: torch.Tensor) -> float:
    white = whitener(x.T @ x)
    whitened = LayerHeads(layer.q @ white, layer.k @ white, layer.v @ white, layer.o)
    rot = Rotary.of("none", D, 0)
    new = svd_merge(layer, whitened, 1, rot, k_normed=False, queries=aware, outputs=aware)
    reference = attend(layer, x)
    return ((attend(new, x) - reference).norm() / reference.norm()).item()


def test_only_the_output_and_query_aware_fits_are_exact_on_planted_heads():
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for which in ("v", "k"):
        layer = planted(which)
        plain, aware = merged_error(layer, False, x), merged_error(layer, True, x)
        assert plain > 1e-2, (which, plain)  # the input-only fit must spend its rank on rows nobody reads
        assert aware < 1e-3 * plain, (which, aware, plain)
