"""The one layer-wise path of a conversion: which of a layer's tensors are loaded, rewritten and written.

Every conversion that changes K and V goes through here, whatever the method: a layer's Q/K/V/O (or fused QKV
and O) go to head form (``convert.heads.to_heads``), the grouping strategy and the merge method rewrite them
(``rewrite_layer``), and the changed tensors come back. Pooling methods with contiguous groups change K and V
alone, so Q and O are neither loaded nor written (they stay byte copies).

A calibrated conversion computes each layer once, while calibration walks the model (``convert.calibrate``),
and leaves the layer's final tensors, already in the output dtype, in a ``Spill`` file beside the output;
the writer takes them from there. An uncalibrated one computes each layer when the writer first asks.

Contract with the writer: a layer is computed (or read back from the spill) once, when the first of its planned
tensors is taken, and released when the last one is; tensors may be taken in any order (a layer whose tensors
straddle two output shards stays held in between). ``LayerResults.computed`` counts the computations (tested).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.head_form import LayerHeads, Rotary, permute
from convert.heads import from_heads, layer_generator, to_heads
from convert.merge import GROUPINGS, METHODS
from convert.roles import Dims
from convert.source import torch_dtype

if TYPE_CHECKING:
    import torch

Tensors = dict[tuple[str, str], "torch.Tensor"]  # (role, param) -> tensor


@dataclass(frozen=True)
class NormTensor:
    """A K norm tensor pooled beside the projections: its output name, how it pools, and its head (per-head norms)."""

    name: str
    operation: str  # pool_norm or pool_norm_heads (convert.roles)
    head: int | None


@dataclass(frozen=True)
class LayerPlan:
    """How whole layers are rewritten, and which of their tensors change (settings only; run state: ``LayerState``).

    Names are the output checkpoint's; ``source_names`` maps them to the source checkpoint's (gpt2 lacks
    bigcode's prefix), and the tensors named in ``transposed`` are stored (in, out) in the source (Conv1D).
    """

    method: str
    grouping: str
    kv_heads: int
    dims: Dims
    layout: str  # the source's QKV row order
    out_layout: str  # the output's
    rotary: str
    rotary_dim: int
    k_normed: bool
    seed: int
    sources: dict[int, dict[tuple[str, str], str]]  # layer -> (role, param) -> tensor name, those loaded
    changed: frozenset[str]  # the roles written
    anchors: list[str]  # each layer's Q or fused QKV weight (calibration measures its input)
    norms: dict[int, list[NormTensor]]  # layer -> its pooled K norms
    source_names: dict[str, str]
    transposed: frozenset[str]
    out_dtypes: dict[str, str]  # each changed tensor's output dtype (safetensors name)

    @property
    def fused_out(self) -> str | None:
        """The output's QKV layout where Q, K and V are fused, else None."""
        return self.out_layout if "qkv" in self.changed else None


@dataclass
class LayerState:
    """What a conversion learns while it runs: each layer's KV-head order, and the spill of calibrated layers."""

    orders: dict[int, list[int]] = field(default_factory=dict)
    spill: Spill | None = None


def changed_roles(method: str, grouping: str, fused: bool) -> frozenset[str]:
    """The roles of a layer that are loaded and rewritten: Q and O only where the method or grouping changes them."""
    with_qo = bool(METHODS[method].changes & {"q", "o"}) or GROUPINGS[grouping].permutes
    if fused:
        return frozenset({"qkv"} | ({"o"} if with_qo else set()))
    return frozenset({"k", "v"} | ({"q", "o"} if with_qo else set()))


def source_heads(plan: LayerPlan, load: Callable[[str], Any], layer: int) -> tuple[LayerHeads, bool]:
    """One layer's source projections in head form: (LayerHeads, whether biases are its last input column)."""
    d = plan.dims
    loaded = {key: load(name) for key, name in plan.sources[layer].items()}
    return to_heads(loaded, plan.layout, d.heads, d.kv_heads, d.head_dim)


def rewrite(
    plan: LayerPlan, state: LayerState, load: Callable[[str], Any], layer: int, moment: torch.Tensor | None = None
) -> tuple[LayerHeads, bool]:
    """One layer's changed projections, loaded and rewritten: (LayerHeads, whether biases are its last column).

    ``moment``: the layer's calibration moment Σ [x, 1][x, 1]ᵀ (float64), or None for an uncalibrated rewrite.
    """
    heads, has_bias = source_heads(plan, load, layer)
    if moment is not None and not has_bias:
        moment = moment[:-1, :-1]  # no bias: the ones column is not part of the input
    new, state.orders[layer] = rewrite_layer(
        heads,
        kv_heads=plan.kv_heads,
        method=plan.method,
        grouping=plan.grouping,
        rot=Rotary.of(plan.rotary, plan.dims.head_dim, plan.rotary_dim),
        k_normed=plan.k_normed,
        moment=moment,
        generator=layer_generator(plan.method, plan.seed, layer),
    )
    return new, has_bias


def rewrite_layer(
    layer: LayerHeads,
    *,
    kv_heads: int,
    method: str,
    grouping: str,
    rot: Rotary,
    k_normed: bool,
    moment: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[LayerHeads, list[int]]:
    """One layer's heads -> the converted ones and the KV-head order the grouping chose.

    The grouping strategy may first permute the heads so that similar ones share a group; then the merge method
    fits each group. Calibrated methods and groupings work in float64, the pooling ones in float32.
    """
    from convert.fits import whitener  # torch: imported when the first layer is rewritten, not when planning

    merge, strategy = METHODS[method], GROUPINGS[grouping]
    layer = _in_precision(layer, double=merge.calibrated or strategy.permutes or moment is not None)
    white = whitener(moment)
    whitened = layer
    if white is not None:
        whitened = layer.replace(k=layer.k @ white, v=layer.v @ white)
        if merge.uses_queries:
            whitened = whitened.replace(q=layer.loaded("q") @ white)
    order = strategy.order(whitened.k.shape[0], kv_heads, merge.group_cost(whitened, rot, k_normed))
    if order != sorted(order):
        layer, whitened = permute(layer, order), permute(whitened, order)
    return merge.fit(layer, whitened, kv_heads, rot, k_normed, generator), order


def _in_precision(layer: LayerHeads, double: bool) -> LayerHeads:
    """The layer's projections in float64 (``double``) or float32."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if double else t.float()

    q, o = (None if t is None else cast(t) for t in (layer.q, layer.o))
    return LayerHeads(q, cast(layer.k), cast(layer.v), o)


def output_tensors(plan: LayerPlan, layer: int, new: LayerHeads, has_bias: bool) -> Tensors:
    """A converted layer's written tensors, (role, param) -> tensor in the output dtype."""
    tensors = from_heads(new, has_bias, plan.fused_out, lambda role: role in plan.changed)
    names = plan.sources[layer]
    return {key: t.to(torch_dtype(plan.out_dtypes[names[key]])) for key, t in tensors.items()}


class Spill:
    """Calibrated layers' final tensors, one safetensors file per layer in a directory the caller removes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.layers: set[int] = set()

    def _file(self, layer: int) -> Path:
        return self.directory / f"layer-{layer:05d}.safetensors"

    def put(self, layer: int, tensors: Tensors) -> None:
        from safetensors.torch import save_file

        save_file({f"{role}.{param}": t.contiguous() for (role, param), t in tensors.items()}, self._file(layer))
        self.layers.add(layer)

    def take(self, layer: int) -> Tensors:
        from safetensors.torch import load_file

        tensors: Tensors = {}
        for key, t in load_file(self._file(layer)).items():
            role, param = key.split(".")
            tensors[role, param] = t
        return tensors


class LayerResults:
    """Each layer's converted tensors: made (or read from the spill) on the first request, released after the last."""

    def __init__(self, plan: LayerPlan, state: LayerState, planned: Counter, load: Callable[[str], Any]):
        self.plan, self.state, self.load = plan, state, load
        self._left = Counter(planned)  # layer -> planned tensors not yet taken
        self._held: dict[int, Tensors] = {}
        self.computed: Counter = Counter()

    def take(self, layer: int, role: str, param: str) -> torch.Tensor:
        """One converted tensor of ``layer`` (in the output dtype)."""
        if layer not in self._held:
            self._held[layer] = self._compute(layer)
            self.computed[layer] += 1
        tensor = self._held[layer][role, param]
        self._left[layer] -= 1
        if self._left[layer] <= 0:
            del self._held[layer]
        return tensor

    def _compute(self, layer: int) -> Tensors:
        spill = self.state.spill
        if spill is not None and layer in spill.layers:
            return spill.take(layer)
        new, has_bias = rewrite(self.plan, self.state, self.load, layer)
        return output_tensors(self.plan, layer, new, has_bias)
