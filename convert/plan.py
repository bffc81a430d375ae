"""Planning a conversion: read the attention sizes, match tensors to roles, decide every output tensor.

Planning works on names, dtypes and shapes alone: shard cuts, the report and
all validation are settled before any byte is written, ``--dry-run`` reads no
tensor data, and torch is first needed when the first K/V tensor is pooled
(``convert.heads``), so the CLI imports it while unchanged tensors are copied.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO

from convert import renames
from convert.errors import ConversionError
from convert.families import Family, MqaForm
from convert.heads import kv_norm, norm_heads
from convert.layers import LayerPlan, LayerResults, LayerState, NormTensor, changed_roles
from convert.merge import GROUPINGS
from convert.roles import LAYER_ROLES, ROLES, Dims, expected_elements, expected_shape
from convert.source import DTYPES as TENSOR_DTYPES
from convert.source import FLOATS, WeightSource, torch_dtype, write_tensor_bytes
from convert.writer import OutTensor

if TYPE_CHECKING:
    import torch

Load = Callable[[str], "torch.Tensor"]  # output name -> the source tensor (Linear layout)


@dataclass
class Plan:
    """Everything decided before writing: output tensors, config and report."""

    tensors: list[OutTensor]
    config: dict[str, Any]
    changed: list[str]  # source names of the tensors rewritten (or, for per-head norms, folded away)
    layers: LayerPlan | None = None  # set when K and V change (the layer-wise path, convert.layers)
    load: Load | None = None  # output name -> the source tensor, as the layer path reads it
    state: LayerState = field(default_factory=LayerState)  # KV-head orders and the spill, filled in as it runs


def _config_int(config: dict[str, Any], aliases: tuple[str, ...], what: str, default: int | None = None) -> int:
    for key in aliases:
        if config.get(key) is not None:
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConversionError(f"config.json: {key} = {value!r} is not a positive integer")
            return value
    if default is None:
        raise ConversionError(f"config.json has no {what} (looked for {', '.join(aliases)})")
    return default


def read_dims(config: dict, spec: Family) -> Dims:
    keys = spec.config
    heads = _config_int(config, keys.heads, "attention head count")
    hidden = _config_int(config, keys.hidden, "hidden size")
    if hidden % heads and not any(config.get(k) for k in keys.head_dim):
        raise ConversionError(f"config.json: hidden size {hidden} is not divisible by {heads} heads")
    head_dim = _config_int(config, keys.head_dim, "head_dim", default=hidden // heads)
    kv_heads = spec.kv_heads_fixed or _config_int(config, keys.kv_heads, "KV head count", default=heads)
    layers = _config_int(config, keys.layers, "layer count")
    if heads % kv_heads:
        raise ConversionError(f"config.json: {heads} attention heads are not divisible by {kv_heads} KV heads")
    if spec.layout == "per_head" and kv_heads != heads:
        raise ConversionError(f"config.json says {kv_heads} KV heads, but this layout has one per head ({heads})")
    return Dims(layers, heads, kv_heads, head_dim, hidden)


def check_kv_heads(kv_heads: int, dims: Dims, family: str, spec: Family) -> None:
    """The requested KV-head count must be reachable from the source by pooling groups."""
    current = dims.kv_heads
    if not isinstance(kv_heads, int) or kv_heads < 1:
        raise ConversionError(f"--kv-heads must be a positive integer, got {kv_heads!r}")
    if kv_heads > current:
        raise ConversionError(
            f"--kv-heads {kv_heads} is more than the {current} KV heads of the source; the converter only merges heads"
        )
    if current % kv_heads:
        choices = [n for n in range(1, current + 1) if current % n == 0]
        raise ConversionError(
            f"--kv-heads {kv_heads} does not divide the {current} KV heads of the source; "
            f"choose one of {', '.join(map(str, choices))}"
        )
    if spec.kv_choices == "mha_or_mqa" and kv_heads not in (1, current):
        raise ConversionError(
            f"--kv-heads {kv_heads}: a {family} checkpoint in this layout can only become MHA "
            f"(--kv-heads {current}) or MQA (--kv-heads 1); the architecture has no GQA form"
        )


class _Roles:
    """Which source tensors play which attention role, found by matching the family's name templates."""

    def __init__(self, spec: Family, dims: Dims, config: dict, names: list[str]):
        self.spec, self.dims, self.config = spec, dims, config
        attention = re.escape(spec.attention).replace(r"\{layer\}", r"(?P<layer>\d+)")
        self.attention = re.compile(attention + r"\.(?P<rest>.+)$")
        self.patterns = {
            role: re.compile(re.escape(module).replace(r"\{head\}", r"(?P<head>\d+)") + r"\.(?P<param>weight|bias)$")
            for role, module in spec.tensors.items()
        }
        self.of: dict[str, tuple[str, int, int | None, str]] = {}  # name -> (role, layer, head, param)
        for name in names:
            match = self.attention.match(name)
            if match:
                self.of[name] = self._classify(name, int(match["layer"]), match["rest"])
        self._check_complete()

    def _classify(self, name: str, layer: int, rest: str) -> tuple[str, int, int | None, str]:
        if layer >= self.dims.layers:
            raise ConversionError(f"tensor {name} is in layer {layer}, but config.json has {self.dims.layers} layers")
        for role, pattern in self.patterns.items():
            match = pattern.fullmatch(rest)
            if match:
                head = int(match["head"]) if "head" in pattern.groupindex else None
                return role, layer, head, match["param"]
        raise ConversionError(
            f"unexpected attention tensor {name}: this {self.spec.architectures[0]} table "
            f"knows {', '.join(self.spec.tensors.values())}"
        )

    def _check_complete(self) -> None:
        found: dict[tuple[int, str, str], set] = {}
        for role, layer, head, param in self.of.values():
            found.setdefault((layer, role, param), set()).add(head)
        needed = [r for r in self.spec.tensors if r in LAYER_ROLES]
        for layer in range(self.dims.layers):
            for role in needed:
                if (layer, role, "weight") not in found:
                    name = self.spec.attention.format(layer=layer) + "." + self.spec.tensors[role] + ".weight"
                    raise ConversionError(f"the checkpoint has no {name}")
        per_head = {"k_norm_per_head": self.dims.kv_heads, "q_norm_per_head": self.dims.heads}
        for (layer, role, _), heads in found.items():
            if role in per_head and heads != set(range(per_head[role])):
                raise ConversionError(
                    f"layer {layer}: {role} norms for heads {sorted(heads)}, expected 0..{per_head[role] - 1}"
                )
        self._check_biases(found)

    def _check_biases(self, found: dict) -> None:
        for key, roles in (("qkv_bias", ("q", "k", "v", "qkv")), ("o_bias", ("o",))):
            rule = getattr(self.spec, key)
            for role in (r for r in roles if r in self.spec.tensors):
                has = {layer for (layer, r, p) in found if r == role and p == "bias"}
                expected = rule if isinstance(rule, bool) else self.config.get(rule)
                if expected is not None and has != (set(range(self.dims.layers)) if expected else set()):
                    what = "has" if has else "lacks"
                    raise ConversionError(
                        f"the checkpoint {what} {self.spec.tensors[role]} biases, but "
                        f"{'the family' if isinstance(rule, bool) else 'config.json ' + rule} "
                        f"says {'they exist' if expected else 'there are none'}"
                    )


def _check_shapes(roles: _Roles, shapes: dict[str, tuple[int, ...]]) -> None:
    d = roles.dims
    for name, (role, _, _, param) in roles.of.items():
        shape = shapes[name]
        expected = expected_shape(role, param, d)
        ok = shape == expected if expected else math.prod(shape) in expected_elements(role, d)
        if not ok:
            want = expected if expected else f"{d.kv_heads if role == 'k_norm' else d.heads} x {d.head_dim} elements"
            raise ConversionError(
                f"{name} has shape {tuple(shape)}, but config.json implies {want} "
                f"({d.heads} heads, {d.kv_heads} KV heads, head_dim {d.head_dim}, hidden {d.hidden})"
            )


def _out_dtype(src: str, requested: str | None) -> str:
    return requested if requested is not None and src in FLOATS else src


@dataclass
class Change:
    """A planned output tensor that is computed: ``make(load)`` returns it, ``load(name)`` reading a source tensor."""

    target: str
    shape: tuple[int, ...]
    make: Callable[[Load], torch.Tensor]


def _rotary_dim(spec: Family, config: dict, head_dim: int) -> int:
    """How many dimensions of a head RoPE rotates (the leading ones, for partial-rotary families)."""
    if spec.rotary == "none":
        return 0
    key = spec.partial_rotary
    if not key:
        return head_dim
    # transformers 5 keeps the fraction in rope_parameters; older configs at the top level
    for where in (config.get("rope_parameters") or {}, config.get("rope_scaling") or {}, config):
        if where.get(key) is not None:
            return int(head_dim * where[key])
    raise ConversionError(f"config.json does not say {key}, which this family's merges need")


def _layer_plan(
    spec: Family,
    config: dict,
    dims: Dims,
    roles: _Roles,
    kv_heads: int,
    method: str,
    grouping: str,
    seed: int,
    canonical: dict[str, str],
    transposed: set[str],
    out_dtypes: dict[str, str],
) -> LayerPlan:
    """The settings of the layer-wise rewrite, with each layer's source tensors of the roles that change."""
    if GROUPINGS[grouping].permutes and any(r in spec.tensors for r in ("k_norm", "k_norm_per_head")):
        raise ConversionError(
            f"--grouping {grouping} cannot yet permute the per-head K norms of this family; use --grouping contiguous"
        )
    changed = changed_roles(method, grouping, "qkv" in spec.tensors)
    sources: dict[int, dict[tuple[str, str], str]] = {}
    norms: dict[int, list[NormTensor]] = {}
    for name, (role, layer, head, param) in roles.of.items():
        if role in changed and not (role == "o" and param == "bias"):
            sources.setdefault(layer, {})[role, param] = name
        if ROLES[role].operation in ("pool_norm", "pool_norm_heads"):
            norms.setdefault(layer, []).append(NormTensor(name, ROLES[role].operation, head))
    anchor = next(n for r, n in spec.tensors.items() if r in ("qkv", "q"))
    return LayerPlan(
        method=method,
        grouping=grouping,
        kv_heads=kv_heads,
        dims=dims,
        layout=spec.layout,
        out_layout=_out_layout(spec, dims, kv_heads),
        rotary=spec.rotary,
        rotary_dim=_rotary_dim(spec, config, dims.head_dim),
        k_normed=spec.k_normed,
        seed=seed,
        sources=sources,
        changed=changed,
        anchors=[spec.attention.format(layer=layer) + "." + anchor + ".weight" for layer in range(dims.layers)],
        norms=norms,
        source_names=canonical,
        transposed=frozenset(transposed),
        out_dtypes={n: out_dtypes[n] for members in sources.values() for n in members.values()},
    )


def _layer_changes(plan: LayerPlan, shapes: dict, kv_heads: int, results: LayerResults) -> dict[str, Change]:
    """Every changed Q/K/V/O (or QKV/O) tensor, computed from its whole layer by ``LayerResults``."""
    d, heads = plan.dims.head_dim, plan.dims.heads
    rows = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d, "qkv": (heads + 2 * kv_heads) * d}
    changes = {}
    for layer, members in plan.sources.items():
        for (role, param), name in members.items():
            shape = shapes[name] if role == "o" else (rows[role], *shapes[name][1:])
            changes[name] = Change(name, shape, partial(_taken, results, layer, role, param))
    return changes


def _taken(results: LayerResults, layer: int, role: str, param: str, load: Load) -> torch.Tensor:
    """A converted tensor from its layer's results (which read the source with their own ``load``)."""
    return results.take(layer, role, param)


def _pooled(pool: Callable[..., torch.Tensor], names: list[str], load: Load) -> torch.Tensor:
    """``pool`` of the named source tensors."""
    return pool(*map(load, names))


def _read(name: str, load: Load) -> torch.Tensor:
    return load(name)


def _new_mqa_form(spec: Family, dims: Dims, kv_heads: int) -> MqaForm | None:
    """The MQA form an architecture with only MHA and MQA forms (legacy Falcon, GPTBigCode, GPT-2) switches to;
    None where it does not switch."""
    if spec.kv_choices == "mha_or_mqa" and kv_heads == 1 and dims.kv_heads != 1:
        return spec.mqa
    return None


def _out_layout(spec: Family, dims: Dims, kv_heads: int) -> str:
    mqa = _new_mqa_form(spec, dims, kv_heads)
    if mqa is not None:
        return mqa.layout
    return spec.mha_layout or spec.layout


def _norm_changes(
    spec: Family, dims: Dims, roles: _Roles, shapes: dict[str, tuple[int, ...]], kv_heads: int, method: str
) -> dict[str, Change | None]:
    """Source name -> its Change for every K norm spanning the KV heads (None: folded into its group's first)."""
    group = dims.kv_heads // kv_heads
    changes: dict[str, Change | None] = {}
    for name, (role, layer, head, param) in roles.of.items():
        operation = ROLES[role].operation
        if operation == "pool_norm":
            shape = shapes[name]
            out_shape = (kv_heads, shape[1]) if len(shape) == 2 else (math.prod(shape) // dims.kv_heads * kv_heads,)
            pool = partial(kv_norm, kv_heads_in=dims.kv_heads, kv_heads=kv_heads, method=method)
            changes[name] = Change(name, out_shape, partial(_pooled, pool, [name]))
        elif operation == "pool_norm_heads":
            if head is None:
                raise ValueError(f"{name} is pooled per head but names no head")
            if head % group:
                changes[name] = None  # pooled into its group's first head below
                continue
            template = spec.attention + "." + spec.tensors[role] + "." + param
            members = [template.format(layer=layer, head=h) for h in range(head, head + group)]
            pool = partial(norm_heads, method=method)
            changes[name] = Change(
                template.format(layer=layer, head=head // group), shapes[name], partial(_pooled, pool, members)
            )
    return changes


def plan_conversion(
    weights: WeightSource,
    config: dict,
    spec: Family,
    dims: Dims,
    kv_heads: int,
    method: str,
    dtype: str | None,
    seed: int,
    grouping: str = "contiguous",
) -> Plan:
    """Decide every output tensor (name, dtype, shape, how to make it) and the output config."""
    canonical = renames.canonical_names(list(weights.tensors), spec.rename)  # output name -> source name
    transposed = renames.transposed(canonical, spec.rename)
    shapes = {}
    for name, src in canonical.items():
        shape = weights.tensors[src].shape
        shapes[name] = tuple(reversed(shape)) if name in transposed else shape
    roles = _Roles(spec, dims, config, list(canonical))
    _check_shapes(roles, shapes)

    def load(name: str) -> torch.Tensor:
        tensor = weights.read(canonical[name])
        return tensor.t() if name in transposed else tensor  # Conv1D (in, out) -> Linear (out, in)

    changes: dict[str, Change | None] = {}
    layers, state = None, LayerState()
    if kv_heads != dims.kv_heads or _out_layout(spec, dims, kv_heads) != spec.layout:  # else: every tensor a copy
        out_dtypes = {n: _out_dtype(weights.tensors[src].dtype, dtype) for n, src in canonical.items()}
        layers = _layer_plan(
            spec, config, dims, roles, kv_heads, method, grouping, seed, canonical, transposed, out_dtypes
        )
        planned = Counter({layer: len(members) for layer, members in layers.sources.items()})
        results = LayerResults(layers, state, planned, load)  # computes nothing until a tensor is taken
        changes = {
            **_norm_changes(spec, dims, roles, shapes, kv_heads, method),
            **_layer_changes(layers, shapes, kv_heads, results),
        }
    tensors = _out_tensors(weights, canonical, transposed, shapes, changes, load, dtype)
    return Plan(tensors, output_config(config, spec, dims, kv_heads, dtype), sorted(changes), layers, load, state)


def _out_tensors(
    weights: WeightSource,
    canonical: dict[str, str],
    transposed: set[str],
    shapes: dict,
    changes: dict[str, Change | None],
    load: Load,
    dtype: str | None,
) -> list[OutTensor]:
    """The output tensors in the source's file order: byte copies, and computed ones (changed, cast or transposed)."""

    def located(name: str) -> tuple[str, int]:
        info = weights.tensors[canonical[name]]
        return str(info.file), info.start

    out: list[OutTensor] = []
    for name in sorted(canonical, key=located):
        src_dtype = weights.tensors[canonical[name]].dtype
        target_dtype = _out_dtype(src_dtype, dtype)
        change = changes.get(name, Change(name, shapes[name], partial(_read, name)))
        if change is None:
            continue
        if name not in changes and name not in transposed and target_dtype == src_dtype:
            out.append(OutTensor(name, src_dtype, shapes[name], partial(weights.copy_raw, canonical[name])))
        else:
            out.append(
                OutTensor(
                    change.target,
                    target_dtype,
                    change.shape,
                    partial(_write_computed, change, load, target_dtype),
                    computed=True,
                )
            )
    return out


def _write_computed(change: Change, load: Load, dtype: str, out: BinaryIO) -> None:
    tensor = change.make(load).to(torch_dtype(dtype))
    if tuple(tensor.shape) != change.shape:
        raise RuntimeError(f"internal error: {change.target} made shape {tuple(tensor.shape)}, planned {change.shape}")
    write_tensor_bytes(tensor, out)


def output_config(config: dict, spec: Family, dims: Dims, kv_heads: int, dtype: str | None) -> dict:
    """The source's config.json with only the KV-head key(s) changed (and the dtype, when --dtype asks)."""
    new = copy.deepcopy(config)
    if spec.rename:
        new = renames.derive_config(spec.rename.config, new, kv_heads)
    aliases = spec.config.kv_heads
    present = [k for k in aliases if k in new]
    for key in present:
        new[key] = kv_heads
    if not present and aliases and kv_heads != dims.kv_heads and spec.kv_choices == "divisors":
        new[aliases[0]] = kv_heads
    mqa = _new_mqa_form(spec, dims, kv_heads)
    if mqa is not None:
        new.update(mqa.config)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in new:
                new[key] = TENSOR_DTYPES[dtype][1]
    return new
