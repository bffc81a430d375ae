"""The one layer-wise path of a conversion: which of a layer's tensors are loaded, rewritten and written.

Every conversion that changes K and V goes through here, whatever the method: a layer's Q/K/V/O (or fused QKV
and O) go to head form (``convert.surgery.to_heads``), the grouping strategy and the merge method rewrite them
(``convert.attention.rewrite_layer``), and the changed tensors come back. Pooling methods with contiguous
groups change K and V alone, so Q and O are neither loaded nor written (they stay byte copies).

Contract with the writer: a layer is computed once, when the first of its planned tensors is taken, and
released when the last one is; tensors may be taken in any order (a layer whose tensors straddle two output
shards stays held in between). ``LayerResults.computed`` counts the computations (tested).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from convert.merge import GROUPINGS, METHODS


@dataclass
class LayerPlan:
    """How whole layers are rewritten, and which of their tensors change.

    ``moments`` (per layer, from ``convert.calibrate``) is filled in after planning; ``modules`` names each
    layer's Q/QKV projection module in the source, where calibration hooks in.
    """

    method: str
    grouping: str
    kv_heads: int
    dims: Any  # convert.plan.Dims
    layout: str
    out_layout: str
    rotary: str
    rotary_dim: int
    k_normed: bool
    seed: int
    sources: dict[int, dict[tuple[str, str], str]]  # layer -> (role, param) -> source tensor name, those loaded
    changed: frozenset[str]  # the roles written
    modules: list[str]
    decoders: list[str]  # each layer's decoder module in the source (sequential calibration runs them one by one)
    pooled_norms: bool  # K norms pooled beside the projections (sequential calibration cannot expand them yet)
    moments: list | None = None
    orders: dict[int, list[int]] = field(default_factory=dict)
    refit_o: bool = False  # O refitted by least squares during sequential calibration (convert.sequential)
    local_steps: int = 0  # Adam steps of local refinement per layer during sequential calibration
    local_lr: float = 5e-3  # relative to each tensor's root mean square (tuned on SmolLM2-135M: README)
    refits: dict = field(default_factory=dict)  # layer -> its LayerHeads (float32) as sequential calibration left them


def changed_roles(method: str, grouping: str, fused: bool) -> frozenset[str]:
    """The roles of a layer that are loaded and rewritten: Q and O only where the method or grouping changes them."""
    with_qo = bool(METHODS[method].changes & {"q", "o"}) or GROUPINGS[grouping].permutes
    if fused:
        return frozenset({"qkv"} | ({"o"} if with_qo else set()))
    return frozenset({"k", "v"} | ({"q", "o"} if with_qo else set()))


class LayerResults:
    """Each layer's converted tensors: computed on the first request, released after the last planned one."""

    def __init__(self, plan: LayerPlan, planned: Counter, load: Callable[[str], Any]):
        self.plan, self.load = plan, load
        self._left = Counter(planned)  # layer -> planned tensors not yet taken
        self._held: dict[int, dict] = {}
        self.computed: Counter = Counter()

    def take(self, layer: int, role: str, param: str):
        """One converted tensor of ``layer`` (float32)."""
        if layer not in self._held:
            self._held[layer] = self._compute(layer)
            self.computed[layer] += 1
        tensor = self._held[layer][role, param]
        self._left[layer] -= 1
        if self._left[layer] <= 0:
            del self._held[layer]
        return tensor

    def _compute(self, layer: int) -> dict:
        from convert import surgery

        new, has_bias = rewrite(self.plan, self.load, layer)
        fused = self.plan.out_layout if "qkv" in self.plan.changed else None
        return surgery.from_heads(new, has_bias, fused, lambda role: role in self.plan.changed)


def rewrite(plan: LayerPlan, load: Callable[[str], Any], layer: int):
    """One layer's changed projections, loaded and rewritten: (LayerHeads, whether biases are its last column)."""
    from convert import surgery
    from convert.attention import Rotary, rewrite_layer

    d = plan.dims
    loaded = {key: load(name) for key, name in plan.sources[layer].items()}
    heads, has_bias = surgery.to_heads(loaded, plan.layout, d.heads, d.kv_heads, d.head_dim)
    moment = None if plan.moments is None else plan.moments[layer]
    if moment is not None and not has_bias:
        moment = moment[:-1, :-1]  # no bias: the ones column is not part of the input
    new, plan.orders[layer] = rewrite_layer(
        heads, kv_heads=plan.kv_heads, method=plan.method, grouping=plan.grouping,
        rot=Rotary.of(plan.rotary, d.head_dim, plan.rotary_dim), k_normed=plan.k_normed, moment=moment,
        generator=surgery.layer_generator(plan.method, plan.seed, layer))
    return plan.refits.get(layer, new), has_bias
