"""Whole-layer rewrites of attention: similarity grouping and activation-aware (``svd``) merging.

Mean pooling touches K and V alone. The rewrites here also change Q and O, so they
work on one layer's projections at once, in head form (biases, where the family
has them, are appended as a last input column: the input is then [x, 1]):

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
from dataclasses import dataclass

import torch

from convert.merge import merge_heads


@dataclass
class Rotary:
    """Which key dimensions RoPE rotates together: pairs (a[j], b[j]); ``rest`` it leaves alone."""

    a: torch.Tensor
    b: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def of(cls, style: str, head_dim: int, rotary_dim: int) -> Rotary:
        """``half``: rotate_half pairs (j, j + r/2); ``interleaved``: (2j, 2j + 1); ``none``: no pairs."""
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
    eye = torch.eye(moment.shape[0], dtype=moment.dtype)
    return torch.linalg.cholesky(moment + ridge * moment.diagonal().mean() * eye)


def _real_fit(heads: torch.Tensor, white: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A group's (s, r, in) head rows -> shared (r, in) rows and mixes (s, r, r): heads[i] ≈ mixes[i] @ shared.

    ``white`` is heads @ L (or heads itself without calibration); the fit is best in that norm.
    Also returns the energy the fit loses.
    """
    s, r, width = heads.shape
    white = white.reshape(s * r, -1)
    u, residual = _top_eigvecs(white @ white.T, r)  # (s*r, r)
    shared = u.T @ heads.reshape(s * r, width) / math.sqrt(s)  # scaled like one head, not like their sum
    return shared, u.reshape(s, r, r) * math.sqrt(s), residual


def _complex_fit(heads: torch.Tensor, white: torch.Tensor, rot: Rotary):
    """Per rotary frequency, a group's complex key rows -> shared rows (F, in) and coefficients (s, F)."""
    z = torch.complex(heads[:, rot.a], heads[:, rot.b]).transpose(0, 1)  # (F, s, in)
    zw = torch.complex(white[:, rot.a], white[:, rot.b]).transpose(0, 1)  # (F, s, in), whitened
    u, residual = _top_eigvecs(zw @ zw.mH, 1)  # (F, s, 1) from the (F, s, s) Hermitian Gram
    s = heads.shape[0]
    shared = (u.mH @ z).squeeze(1) / math.sqrt(s)  # (F, in)
    return shared, u.squeeze(-1).T * math.sqrt(s), residual.sum()


def merge_cost(k: torch.Tensor, v: torch.Tensor, group: list[int], method: str, rot: Rotary,
               k_normed: bool) -> float:
    """How much of K's and V's whitened energy merging ``group`` loses, relative to their energy.

    ``k`` and ``v`` are whitened rows (G, d, in) (rows @ L); the fits only need whitened rows.
    """
    idx = torch.tensor(group)
    total = 0.0
    for which, heads in (("k", k[idx]), ("v", v[idx])):
        energy = float(heads.square().sum())
        if method == "svd" and which == "v":
            lost = _real_fit(heads, heads)[2]
        elif method == "svd" and not k_normed:
            lost = _complex_fit(heads, heads, rot)[2] if len(rot.a) else 0.0
            if len(rot.rest):
                lost = lost + _real_fit(heads[:, rot.rest], heads[:, rot.rest])[2]
        else:
            lost = (heads - heads.mean(0, keepdim=True)).square().sum()
        total += float(lost) / max(energy, 1e-30)
    return total


def similarity_groups(k: torch.Tensor, v: torch.Tensor, kv_heads: int, method: str, rot: Rotary,
                      k_normed: bool) -> list[int]:
    """An equal-size partition of the G KV heads (whitened rows) that loses little when each part is merged.

    Greedy: the cheapest pair of heads left seeds a group, which grows by the head that raises its
    merge cost least. Returns the KV-head order that makes the chosen groups contiguous.
    """
    heads = k.shape[0]
    size = heads // kv_heads
    if size == 1:
        return list(range(heads))
    left = list(range(heads))
    groups: list[list[int]] = []
    while left:
        if len(left) == size:
            group = left
        else:
            pairs = [(merge_cost(k, v, [i, j], method, rot, k_normed), i, j)
                     for n, i in enumerate(left) for j in left[n + 1:]]
            _, i, j = min(pairs)
            group = [i, j]
            while len(group) < size:
                costs = [(merge_cost(k, v, group + [h], method, rot, k_normed), h) for h in left if h not in group]
                group.append(min(costs)[1])
        groups.append(sorted(group))
        left = [h for h in left if h not in group]
    return [h for group in sorted(groups) for h in group]  # groups in order of their first head


def permute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, order: list[int]):
    """Reorder KV heads by ``order``, with the query heads that read each one and their O columns.

    [k0, k1, k2] with order [2, 0, 1] -> [k2, k0, k1]; query blocks [q0.. | q1.. | q2..] follow.
    The model computes the same function: heads are summed by O in any order.
    """
    heads, kv = q.shape[0], k.shape[0]
    idx = torch.tensor(order)
    reads = heads // kv
    q = q.reshape(kv, reads, *q.shape[1:])[idx].reshape(q.shape)
    o = o.reshape(o.shape[0], kv, reads, o.shape[-1])[:, idx].reshape(o.shape)
    return q, k[idx], v[idx], o


def svd_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, kw: torch.Tensor,
              vw: torch.Tensor, kv_heads: int, rot: Rotary, k_normed: bool):
    """Merge consecutive groups of KV heads into ``kv_heads`` heads, folding the mixes into Q and O.

    ``kw``, ``vw`` are k and v whitened (rows @ L of ``whitener``; k and v themselves for plain
    weight-space fits). Returns (q, k, v, o) with k, v: (N, d, in).
    """
    heads = q.shape[0]
    group, reads = k.shape[0] // kv_heads, heads // k.shape[0]
    q, o = q.clone(), o.clone()
    new_k, new_v = torch.empty(kv_heads, *k.shape[1:], dtype=k.dtype), torch.empty(kv_heads, *v.shape[1:],
                                                                                     dtype=v.dtype)
    for n in range(kv_heads):
        members = range(n * group, (n + 1) * group)
        part = slice(members.start, members.stop)
        new_v[n], mixes, _ = _real_fit(v[part], vw[part])
        for i, old in enumerate(members):
            for h in range(old * reads, (old + 1) * reads):
                o[:, h] = o[:, h] @ mixes[i]  # (out, d) @ (d, d)
        ks, ksw = k[part], kw[part]
        if k_normed:
            new_k[n] = ks.mean(0)
            continue
        if len(rot.a):
            shared, coef = _complex_fit(ks, ksw, rot)[:2]  # (F, in), (s, F)
            new_k[n, rot.a], new_k[n, rot.b] = shared.real, shared.imag
            for i, old in enumerate(members):
                c = coef[i].unsqueeze(-1)  # (F, 1)
                for h in range(old * reads, (old + 1) * reads):
                    qa, qb = q[h, rot.a], q[h, rot.b]
                    q[h, rot.a], q[h, rot.b] = qa * c.real + qb * c.imag, qb * c.real - qa * c.imag
        if len(rot.rest):
            shared, mixes, _ = _real_fit(ks[:, rot.rest], ksw[:, rot.rest])
            new_k[n, rot.rest] = shared
            for i, old in enumerate(members):
                for h in range(old * reads, (old + 1) * reads):
                    q[h, rot.rest] = mixes[i].T @ q[h, rot.rest]
    return q, new_k, new_v, o


def rewrite_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, *, kv_heads: int,
                  method: str, grouping: str, rot: Rotary, k_normed: bool, moment: torch.Tensor | None,
                  generator: torch.Generator | None = None):
    """One layer's (q, k, v, o) in head form -> the converted ones and the KV-head order used.

    ``grouping`` ``similarity`` first permutes the heads so that similar ones share a group.
    """
    q, k, v, o = (t.double() for t in (q, k, v, o))
    white = whitener(moment)
    kw, vw = (k, v) if white is None else (k @ white, v @ white)  # whitened once, for grouping and fits
    order = list(range(k.shape[0]))
    if grouping == "similarity":
        order = similarity_groups(kw, vw, kv_heads, method, rot, k_normed)
        q, k, v, o = permute(q, k, v, o, order)
        kw, vw = kw[order], vw[order]
    if method == "svd":
        q, k, v, o = svd_merge(q, k, v, o, kw, vw, kv_heads, rot, k_normed)
    elif k.shape[0] != kv_heads:
        k = merge_heads(k, kv_heads, method, generator).double()
        v = merge_heads(v, kv_heads, method, generator).double()
    return q, k, v, o, order
