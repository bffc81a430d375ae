"""Planning a conversion: read the attention sizes, match tensors to roles, decide every output tensor.

Planning works on names, dtypes and shapes alone: shard cuts, the report and
all validation are settled before any byte is written, ``--dry-run`` reads no
tensor data, and torch is first needed when the first K/V tensor is pooled
(``convert.surgery``), so the CLI imports it while unchanged tensors are copied.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from convert import renames
from convert.errors import ConversionError
from convert.families import Family
from convert.source import DTYPES as TENSOR_DTYPES
from convert.source import FLOATS, WeightSource, torch_dtype, write_tensor_bytes
from convert.writer import OutTensor


@dataclass
class Dims:
    """Attention sizes read from config.json."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


@dataclass
class Plan:
    """Everything decided before writing: output tensors, config and report."""

    tensors: list[OutTensor]
    config: dict[str, Any]
    changed: list[str]  # source names of the tensors rewritten (or, for per-head norms, folded away)
    layers: LayerRewrite | None = None  # set when whole layers are rewritten (svd, similarity grouping)


def _config_int(config: dict, aliases: list[str], what: str, default: int | None = None) -> int:
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
        raise ConversionError(f"--kv-heads {kv_heads} is more than the {current} KV heads of the source; "
                              "the converter only merges heads")
    if current % kv_heads:
        choices = [n for n in range(1, current + 1) if current % n == 0]
        raise ConversionError(f"--kv-heads {kv_heads} does not divide the {current} KV heads of the source; "
                              f"choose one of {', '.join(map(str, choices))}")
    if spec.kv_choices == "mha_or_mqa" and kv_heads not in (1, current):
        raise ConversionError(f"--kv-heads {kv_heads}: a {family} checkpoint in this layout can only become MHA "
                              f"(--kv-heads {current}) or MQA (--kv-heads 1); the architecture has no GQA form")


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
        raise ConversionError(f"unexpected attention tensor {name}: this {self.spec.architectures[0]} table "
                              f"knows {', '.join(self.spec.tensors.values())}")

    def _check_complete(self) -> None:
        found: dict[tuple[int, str, str], set] = {}
        for role, layer, head, param in self.of.values():
            found.setdefault((layer, role, param), set()).add(head)
        needed = [r for r in self.spec.tensors if r in ("q", "k", "v", "o", "qkv")]
        for layer in range(self.dims.layers):
            for role in needed:
                if (layer, role, "weight") not in found:
                    name = self.spec.attention.format(layer=layer) + "." + self.spec.tensors[role] + ".weight"
                    raise ConversionError(f"the checkpoint has no {name}")
        per_head = {"k_norm_per_head": self.dims.kv_heads, "q_norm_per_head": self.dims.heads}
        for (layer, role, _), heads in found.items():
            if role in per_head and heads != set(range(per_head[role])):
                raise ConversionError(f"layer {layer}: {role} norms for heads {sorted(heads)}, "
                                      f"expected 0..{per_head[role] - 1}")
        self._check_biases(found)

    def _check_biases(self, found: dict) -> None:
        for key, roles in (("qkv_bias", ("q", "k", "v", "qkv")), ("o_bias", ("o",))):
            rule = getattr(self.spec, key)
            for role in (r for r in roles if r in self.spec.tensors):
                has = {layer for (layer, r, p) in found if r == role and p == "bias"}
                expected = rule if isinstance(rule, bool) else self.config.get(rule)
                if expected is not None and has != (set(range(self.dims.layers)) if expected else set()):
                    what = "has" if has else "lacks"
                    raise ConversionError(f"the checkpoint {what} {self.spec.tensors[role]} biases, but "
                                          f"{'the family' if isinstance(rule, bool) else 'config.json ' + rule} "
                                          f"says {'they exist' if expected else 'there are none'}")

    def expected_shape(self, role: str, param: str) -> tuple[int, ...] | None:
        """The shape config.json implies for a role (None where only the element count is fixed)."""
        d = self.dims
        rows = {"q": d.heads * d.head_dim, "k": d.kv_heads * d.head_dim, "v": d.kv_heads * d.head_dim,
                "qkv": (d.heads + 2 * d.kv_heads) * d.head_dim, "o": d.hidden,
                "k_norm_per_head": d.head_dim, "q_norm_per_head": d.head_dim, "k_norm_shared": d.head_dim}.get(role)
        if rows is None:
            return None
        if param == "bias" or role.endswith(("per_head", "shared")):
            return (rows,)
        return (rows, d.heads * d.head_dim) if role == "o" else (rows, d.hidden)


def _check_shapes(roles: _Roles, shapes: dict[str, tuple[int, ...]]) -> None:
    d = roles.dims
    for name, (role, _, _, param) in roles.of.items():
        shape = shapes[name]
        expected = roles.expected_shape(role, param)
        ok = shape == expected if expected else math.prod(shape) in {
            "k_norm": (d.kv_heads * d.head_dim,), "q_norm": (d.head_dim, d.heads * d.head_dim)}[role]
        if not ok:
            want = expected if expected else f"{d.kv_heads if role == 'k_norm' else d.heads} x {d.head_dim} elements"
            raise ConversionError(f"{name} has shape {tuple(shape)}, but config.json implies {want} "
                                  f"({d.heads} heads, {d.kv_heads} KV heads, head_dim {d.head_dim}, hidden {d.hidden})")


def _out_dtype(src: str, requested: str | None) -> str:
    return requested if requested is not None and src in FLOATS else src


@dataclass
class Change:
    """A planned output tensor that is computed: ``surgery.<op>(*sources, **kwargs)``."""

    target: str
    shape: tuple[int, ...]
    op: str
    sources: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)


LAYER_ROLES = ("q", "k", "v", "o", "qkv")


@dataclass
class LayerRewrite:
    """The settings of whole-layer rewrites (``convert.attention``), and the layers' results as made.

    ``moments`` (per layer, from ``convert.calibrate``) is filled in after planning; ``modules``
    names each layer's Q/QKV projection module in the source, where calibration hooks in.
    """

    method: str
    grouping: str
    kv_heads: int
    dims: Dims
    layout: str
    out_layout: str
    rotary: str
    rotary_dim: int
    k_normed: bool
    seed: int
    sources: dict[int, dict[tuple[str, str], str]]  # layer -> (role, param) -> tensor name
    modules: list[str]
    moments: list | None = None
    orders: dict[int, list[int]] = field(default_factory=dict)
    _cache: tuple[int, dict] | None = None

    def tensor(self, load: Callable, layer: int, role: str, param: str):
        """One converted tensor of ``layer``; the whole layer is computed once, on its first tensor."""
        if self._cache is None or self._cache[0] != layer:
            from convert import surgery

            loaded = {key: load(name) for key, name in self.sources[layer].items()}
            moment = None if self.moments is None else self.moments[layer]
            result, self.orders[layer] = surgery.layer_tensors(loaded, self, moment, layer)
            self._cache = (layer, result)
        return self._cache[1][role, param]


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


def _layer_changes(spec: Family, config: dict, dims: Dims, roles: _Roles, shapes: dict, kv_heads: int, method: str,
                   grouping: str, seed: int, out_layout: str, rename: dict | None,
                   canonical: dict[str, str]) -> tuple[dict[str, Change], LayerRewrite]:
    """Every Q/K/V/O tensor becomes a Change computed from its whole layer (see ``LayerRewrite``)."""
    if grouping == "similarity" and any(r in spec.tensors for r in ("k_norm", "k_norm_per_head")):
        raise ConversionError("--grouping similarity cannot yet permute the per-head K norms of this family; "
                              "use --grouping contiguous")
    sources: dict[int, dict[tuple[str, str], str]] = {}
    for name, (role, layer, _, param) in roles.of.items():
        if role in LAYER_ROLES and not (role == "o" and param == "bias"):
            sources.setdefault(layer, {})[role, param] = name
    anchor = "qkv" if "qkv" in spec.tensors else "q"
    modules = [canonical[sources[layer][anchor, "weight"]].removesuffix(".weight") for layer in range(dims.layers)]
    rewrite = LayerRewrite(method, grouping, kv_heads, dims, spec.layout, out_layout, spec.rotary,
                           _rotary_dim(spec, config, dims.head_dim), spec.k_normed, seed, sources, modules)
    d = dims.head_dim
    rows = {"q": dims.heads * d, "k": kv_heads * d, "v": kv_heads * d, "qkv": (dims.heads + 2 * kv_heads) * d}
    changes = {}
    for layer, members in sources.items():
        for (role, param), name in members.items():
            shape = shapes[name] if role == "o" else (rows[role], *shapes[name][1:])
            changes[name] = Change(name, shape, "layer_tensor", [], dict(layer=layer, role=role, param=param))
    return changes, rewrite


def _becomes_mqa(spec: Family, dims: Dims, kv_heads: int) -> bool:
    """An architecture with only MHA and MQA forms (legacy Falcon, GPTBigCode, GPT-2) switches to MQA."""
    return spec.kv_choices == "mha_or_mqa" and kv_heads == 1 and dims.kv_heads != 1


def _out_layout(spec: Family, dims: Dims, kv_heads: int) -> str:
    if _becomes_mqa(spec, dims, kv_heads):
        return spec.mqa.layout
    return spec.mha_layout or spec.layout


def _plan_changes(spec: Family, dims: Dims, roles: _Roles, shapes: dict[str, tuple[int, ...]], kv_heads: int,
                  method: str, seed: int, layer_wise: bool = False) -> dict[str, Change | None]:
    """Source name -> its Change, for every tensor the conversion rewrites (None: folded into another).

    With ``layer_wise`` the K/V/Q/O tensors are left to ``_layer_changes``; only K norms are planned here.
    """
    d, group = dims.head_dim, dims.kv_heads // kv_heads
    out_layout = _out_layout(spec, dims, kv_heads)
    if kv_heads == dims.kv_heads and out_layout == spec.layout and not layer_wise:
        return {}  # the identity: every tensor is a byte copy
    if method not in ("first", "random"):
        method = "mean"  # K norms (the only per-tensor merges left with svd) are mean-pooled
    common = dict(kv_heads_in=dims.kv_heads, kv_heads=kv_heads, method=method, seed=seed)
    changes: dict[str, Change | None] = {}
    for name, (role, layer, head, param) in roles.of.items():
        shape = shapes[name]
        if layer_wise and role in LAYER_ROLES:
            continue
        if role in ("k", "v"):
            changes[name] = Change(name, (kv_heads * d, *shape[1:]), "kv_rows", [name],
                                   dict(common, head_dim=d, name=name))
        elif role == "qkv":
            changes[name] = Change(name, ((dims.heads + 2 * kv_heads) * d, *shape[1:]), "fused_qkv", [name],
                                   dict(common, layout=spec.layout, out_layout=out_layout, heads=dims.heads,
                                        head_dim=d, name=name))
        elif role == "k_norm":
            out_shape = (kv_heads, shape[1]) if len(shape) == 2 else (math.prod(shape) // dims.kv_heads * kv_heads,)
            changes[name] = Change(name, out_shape, "kv_norm", [name], dict(common, name=name))
        elif role == "k_norm_per_head":
            if head % group:
                changes[name] = None  # pooled into its group's first head below
                continue
            template = spec.attention + "." + spec.tensors[role] + "." + param
            sources = [template.format(layer=layer, head=h) for h in range(head, head + group)]
            target = template.format(layer=layer, head=head // group)
            changes[name] = Change(target, shape, "norm_heads", sources, dict(method=method, seed=seed, name=name))
    return changes


def plan_conversion(weights: WeightSource, config: dict, spec: Family, dims: Dims, kv_heads: int,
                    method: str, dtype: str | None, seed: int, grouping: str = "contiguous") -> Plan:
    """Decide every output tensor (name, dtype, shape, how to make it) and the output config."""
    rename = spec.rename
    canonical = renames.canonical_names(list(weights.tensors), rename)  # output name -> source name
    transposed = renames.transposed(canonical, rename)
    shapes = {}
    for name, src in canonical.items():
        shape = weights.tensors[src].shape
        shapes[name] = tuple(reversed(shape)) if name in transposed else shape
    roles = _Roles(spec, dims, config, list(canonical))
    _check_shapes(roles, shapes)
    layer_wise = method == "svd" or grouping == "similarity"
    changes = _plan_changes(spec, dims, roles, shapes, kv_heads, method, seed, layer_wise)
    layers = None
    if layer_wise:
        layer_changes, layers = _layer_changes(spec, config, dims, roles, shapes, kv_heads, method, grouping, seed,
                                               _out_layout(spec, dims, kv_heads), rename, canonical)
        changes.update(layer_changes)

    def load(name: str):
        tensor = weights.read(canonical[name])
        return tensor.t() if name in transposed else tensor  # Conv1D (in, out) -> Linear (out, in)

    def located(name: str) -> tuple[str, int]:
        info = weights.tensors[canonical[name]]
        return str(info.file), info.start

    out: list[OutTensor] = []
    for name in sorted(canonical, key=located):
        src_dtype = weights.tensors[canonical[name]].dtype
        target_dtype = _out_dtype(src_dtype, dtype)
        change = changes.get(name, Change(name, shapes[name], "same", [name]))
        if change is None:
            continue
        if change.op == "same" and name not in transposed and target_dtype == src_dtype:
            out.append(OutTensor(name, src_dtype, shapes[name], partial(weights.copy_raw, canonical[name])))
        else:
            out.append(OutTensor(change.target, target_dtype, change.shape,
                                 partial(_write_computed, change, load, target_dtype, layers), computed=True))
    return Plan(out, output_config(config, spec, dims, kv_heads, dtype), sorted(changes), layers)


def _write_computed(change: Change, load: Callable, dtype: str, layers: LayerRewrite | None, out) -> None:
    from convert import surgery  # torch is needed from here on only

    if change.op == "layer_tensor":
        tensor = layers.tensor(load, **change.kwargs)
    else:
        tensor = getattr(surgery, change.op)(*(load(s) for s in change.sources), **change.kwargs)
    tensor = tensor.to(torch_dtype(dtype))
    if tuple(tensor.shape) != change.shape:
        raise RuntimeError(f"internal error: {change.op} made shape {tuple(tensor.shape)}, planned {change.shape}")
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
    if _becomes_mqa(spec, dims, kv_heads):
        new.update(spec.mqa.config)
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in new:
                new[key] = TENSOR_DTYPES[dtype][1]
    return new
