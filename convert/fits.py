"""The fits of one layer's attention heads: activation-aware (``svd``, ``aware``) merging, and the energy a merge loses.

Mean pooling touches K and V alone. The rewrites here also change Q and O, so they
work on one layer's projections at once, in head form (``convert.head_form``; biases,
where the family has them, are appended as a last input column: the input is then [x, 1]):

    q: (H, d, in)   k: (G, d, in)   v: (G, d, in)   o: (out, H, d)

Query head h reads KV head h // (H / G), as transformers' ``repeat_kv`` does.

Activation awareness: with C = sum over calibration tokens of x xᵀ (the second
moment of the attention input), the error a merge makes on real activations is
||(W - W') x||² summed = tr((W - W') C (W - W')ᵀ). For a stack S of a group's
head rows, the best rank-r rows under that norm come from the whitened SVD:
with C = L Lᵀ (Cholesky, small ridge), the top-r left singular vectors U of S L
(taken as eigenvectors of (S L)(S L)ᵀ). The shared rows Uᵀ S need no inverse of L.

- V: S stacks the group's value heads (s*d rows); the shared head is
  V' = Uᵀ S (rank d), and old head i is V_i ≈ M_i V' with M_i its d x d block
  of U. Attention mixes values linearly, so M_i folds into the O columns of
  every query head that read head i: O_h <- O_h M_i.
- K with RoPE: RoPE turns rotary pair (a, b) of a key by a position angle, i.e.
  multiplies the complex number k_a + i k_b by e^{iθ}. A d x d mix would not
  commute with that; a complex scalar per frequency does. Per frequency the
  group's complex rows get their rank-1 fit K_i ≈ c_i K', and since
  q·k = Re(q conj(k)), conj(c_i) folds into the same pair of every query head
  that read head i: the scores are unchanged up to the fit, RoPE included.
  Dimensions RoPE leaves alone (partial rotary) get the real treatment of V
  with M_iᵀ folded into the query rows.
- Families that normalize K before RoPE cannot fold anything through the norm:
  K is mean-pooled there (the report says so) and V still gets the above.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from convert.head_form import LayerHeads, Rotary


def _top_eigvecs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k leading eigenvectors (columns) of Hermitian (..., n, n) matrices and the residual eigenvalue sum."""
    values, vectors = torch.linalg.eigh(gram)  # ascending
    residual = values[..., :-k].clamp(min=0).sum(-1) if gram.shape[-1] > k else values.new_zeros(values.shape[:-1])
    return vectors[..., -k:].flip(-1), residual


def whitener(moment: torch.Tensor | None, ridge: float = 1e-4) -> torch.Tensor | None:
    """L with L Lᵀ = C + ridge * mean(diag C) * I (Cholesky, float64); the ridge keeps C definite."""
    if moment is None:
        return None
    moment = moment.double()
    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    return torch.linalg.cholesky(moment + ridge * moment.diagonal().mean() * eye)


def _real_fit(
    heads: torch.Tensor, white: torch.Tensor, left: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A group's (s, r, in) head rows -> shared (r, in) rows and mixes (s, r, r): heads[i] ≈ mixes[i] @ shared.

    ``white`` is heads @ L (or heads itself without calibration); the fit is best in that norm. ``left``
    (s, r, r), when given, is a metric on each head's output: the error of head i counts as
    tr(P_i E C Eᵀ) (P_i the O columns' Gram, or the queries' second moment), fitted on R_i heads[i] with
    R_iᵀ R_i = P_i and mapped back through R_i⁻¹. Also returns the energy the fit loses.
    """
    if left is not None:
        r_ = torch.linalg.cholesky(_ridged(left)).mT  # (s, r, r) upper: R_iᵀ R_i = P_i
        shared, mixes, residual = _real_fit(r_ @ heads, r_ @ white)
        return shared, torch.linalg.solve_triangular(r_, mixes, upper=True), residual
    s, r, width = heads.shape
    white = white.reshape(s * r, -1)
    u, residual = _top_eigvecs(white @ white.T, r)  # (s*r, r)
    shared = u.T @ heads.reshape(s * r, width) / math.sqrt(s)  # scaled like one head, not like their sum
    return shared, u.reshape(s, r, r) * math.sqrt(s), residual


def _ridged(gram: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """(..., n, n) Gram + ridge * its mean diagonal * I: definite, so that R⁻¹ exists."""
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[..., None, None]
    return gram + ridge * scale * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def _complex_fit(
    heads: torch.Tensor, white: torch.Tensor, rot: Rotary, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rotary frequency, a group's complex key rows -> shared rows (F, in) and coefficients (s, F).

    ``weight`` (s, F), when given, weighs head i's error at frequency f (the energy of the queries that read it
    there): rows are scaled by its square root for the fit and the coefficients unscaled after.
    """
    z = torch.complex(heads[:, rot.a], heads[:, rot.b]).transpose(0, 1)  # (F, s, in)
    zw = torch.complex(white[:, rot.a], white[:, rot.b]).transpose(0, 1)  # (F, s, in), whitened
    root = None
    if weight is not None:
        root = (weight / weight.mean(0, keepdim=True).clamp(min=1e-30)).clamp(min=1e-8).sqrt().T  # (F, s)
        z, zw = z * root[..., None], zw * root[..., None]
    u, residual = _top_eigvecs(zw @ zw.mH, 1)  # (F, s, 1) from the (F, s, s) Hermitian Gram
    s = heads.shape[0]
    shared = (u.mH @ z).squeeze(1) / math.sqrt(s)  # (F, in)
    coef = u.squeeze(-1).T * math.sqrt(s)  # (s, F)
    return shared, (coef if root is None else coef / root.T), residual.sum()


def query_energy(qw: torch.Tensor, reads: int, rot: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """What each KV head's key error costs, from the queries that read it (qw: (H, d, in) = Q_h L).

    Returns (G, F) query energy per rotary frequency (|q_a|² + |q_b|² summed over the reading heads: RoPE turns
    each pair, so only its energy matters) and (G, r, r) the query second moment on the unrotated dims.
    """
    heads = qw.shape[0]
    energy = qw.square().sum(-1).reshape(heads // reads, reads, -1).sum(1)  # (G, d): E q_j² per dim
    rest = qw[:, rot.rest]
    gram = (rest @ rest.mT).reshape(heads // reads, reads, len(rot.rest), len(rot.rest)).sum(1)
    return energy[:, rot.a] + energy[:, rot.b], gram


def output_gram(o: torch.Tensor, reads: int) -> torch.Tensor:
    """(G, d, d): Σ O_hᵀ O_h over the query heads h that read each value head (o: (out, H, d))."""
    blocks = o.permute(1, 0, 2)  # (H, out, d)
    gram = blocks.mT @ blocks  # (H, d, d)
    return gram.reshape(-1, reads, *gram.shape[1:]).sum(1)


def mean_lost_energy(heads: torch.Tensor) -> torch.Tensor:
    """The energy mean-pooling these (s, d, in) heads loses: Σ ||head_i - mean||² (what pooling methods lose, and
    what ``svd`` loses on K where K is normalized before RoPE, as it mean-pools K there)."""
    return (heads - heads.mean(0, keepdim=True)).square().sum()


def svd_lost_energy(heads: torch.Tensor, which: str, rot: Rotary, k_normed: bool) -> torch.Tensor:
    """The whitened energy the svd fit of these (s, d, in) whitened ``k`` or ``v`` heads loses."""
    if which == "v":
        return _real_fit(heads, heads)[2]
    if k_normed:  # K is mean-pooled in these families
        return mean_lost_energy(heads)
    lost = _complex_fit(heads, heads, rot)[2] if len(rot.a) else heads.new_zeros(())
    if len(rot.rest):
        lost = lost + _real_fit(heads[:, rot.rest], heads[:, rot.rest])[2]
    return lost


def relative_lost_energy(
    whitened: LayerHeads, group: list[int], lost_energy: Callable[[torch.Tensor, str], torch.Tensor]
) -> float:
    """How much of K's and V's whitened energy merging ``group`` loses, relative to their energy.

    ``lost_energy(heads, which)`` is what merging the (s, d, in) whitened ``which`` ("k" or "v") heads loses.
    """
    idx = torch.tensor(group)
    total = 0.0
    for which, heads in (("k", whitened.k[idx]), ("v", whitened.v[idx])):
        energy = float(heads.square().sum())
        total += float(lost_energy(heads, which)) / max(energy, 1e-30)
    return total


def _fold_v(o: torch.Tensor, mixes: torch.Tensor, members: range, reads: int) -> None:
    """O_h <- O_h M_i for every query head h that read old value head i (in place)."""
    for i, old in enumerate(members):
        for h in range(old * reads, (old + 1) * reads):
            o[:, h] = o[:, h] @ mixes[i]  # (out, d) @ (d, d)


def _fit_k(
    q: torch.Tensor,
    ks: torch.Tensor,
    ksw: torch.Tensor,
    members: range,
    reads: int,
    rot: Rotary,
    queries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A group's shared key head; the coefficients fold into the query heads that read each old head (in place).

    ``queries`` (the group's slice of ``query_energy``) weighs each head's key error by the queries reading it.
    """
    shared_k = torch.empty(ks.shape[1:], dtype=ks.dtype)
    weight, gram = queries if queries is not None else (None, None)
    if len(rot.a):
        shared, coef = _complex_fit(ks, ksw, rot, weight)[:2]  # (F, in), (s, F)
        shared_k[rot.a], shared_k[rot.b] = shared.real, shared.imag
        for i, old in enumerate(members):
            c = coef[i].unsqueeze(-1)  # (F, 1)
            for h in range(old * reads, (old + 1) * reads):
                qa, qb = q[h, rot.a], q[h, rot.b]
                q[h, rot.a], q[h, rot.b] = qa * c.real + qb * c.imag, qb * c.real - qa * c.imag
    if len(rot.rest):
        shared, mixes, _ = _real_fit(ks[:, rot.rest], ksw[:, rot.rest], gram)
        shared_k[rot.rest] = shared
        for i, old in enumerate(members):
            for h in range(old * reads, (old + 1) * reads):
                q[h, rot.rest] = mixes[i].T @ q[h, rot.rest]
    return shared_k


def svd_merge(
    layer: LayerHeads,
    whitened: LayerHeads,
    kv_heads: int,
    rot: Rotary,
    k_normed: bool,
    queries: bool = False,
    outputs: bool = False,
) -> LayerHeads:
    """Merge consecutive groups of KV heads into ``kv_heads`` heads, folding the mixes into Q and O.

    ``whitened`` holds q, k and v whitened (rows @ L of ``whitener``; themselves for plain weight-space fits).
    ``queries``: weigh each key head's error by the queries that read it (per rotary frequency; the query
    Gram on unrotated dims). ``outputs``: fit each value head in the norm of the O columns that carry it.
    Returns the layer with k, v: (N, d, in) and the mixes folded into q and o.
    """
    k, v, q, o = layer.k, layer.v, layer.loaded("q").clone(), layer.loaded("o").clone()  # q, o: folded into
    group, reads = k.shape[0] // kv_heads, q.shape[0] // k.shape[0]
    energy = query_energy(whitened.loaded("q"), reads, rot) if queries else None  # (G, F), (G, r, r)
    o_gram = output_gram(o, reads) if outputs else None  # before any fold
    new_k = torch.empty(kv_heads, *k.shape[1:], dtype=k.dtype)
    new_v = torch.empty(kv_heads, *v.shape[1:], dtype=v.dtype)
    for n in range(kv_heads):
        members = range(n * group, (n + 1) * group)
        part = slice(members.start, members.stop)
        new_v[n], mixes, _ = _real_fit(v[part], whitened.v[part], None if o_gram is None else o_gram[part])
        _fold_v(o, mixes, members, reads)
        if k_normed:
            new_k[n] = k[part].mean(0)
            continue
        metric = None if energy is None else (energy[0][part], energy[1][part])
        new_k[n] = _fit_k(q, k[part], whitened.k[part], members, reads, rot, metric)
    return LayerHeads(q, new_k, new_v, o)
