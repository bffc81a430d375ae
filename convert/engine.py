"""The generic engine: plan a conversion from a family table, then stream it to disk.

Planning runs every tensor transform on ``meta`` tensors, so shapes, shard cuts,
the report and all validation are settled before any byte is written, and
``--dry-run`` costs no reads of tensor data.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from convert import families, layouts, renames
from convert.errors import ConversionError
from convert.merge import METHODS, merge_heads
from convert.source import WeightSource, open_weights, read_config, resolve_source
from convert.writer import (AtomicDirectory, OutTensor, check_output, parse_size, shard_names, shard_plan,
                            write_index, write_shard, write_tensor_bytes)

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.onnx|\.index\.json)$")
_WRITTEN_HERE = {"config.json", "README.md", "conversion.json", ".gitattributes"}
VERSION = "0.1.0"

Loader = Callable[[str], torch.Tensor]


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
    report: dict[str, Any]
    changed: list[str] = field(default_factory=list)


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


def read_dims(config: dict, spec: dict) -> Dims:
    keys = spec["config"]
    heads = _config_int(config, keys["heads"], "attention head count")
    hidden = _config_int(config, keys["hidden"], "hidden size")
    if hidden % heads and not any(config.get(k) for k in keys.get("head_dim", [])):
        raise ConversionError(f"config.json: hidden size {hidden} is not divisible by {heads} heads")
    head_dim = _config_int(config, keys.get("head_dim", []), "head_dim", default=hidden // heads)
    kv_heads = spec.get("kv_heads_fixed") or _config_int(config, keys["kv_heads"], "KV head count", default=heads)
    layers = _config_int(config, keys["layers"], "layer count")
    if heads % kv_heads:
        raise ConversionError(f"config.json: {heads} attention heads are not divisible by {kv_heads} KV heads")
    if spec["layout"] == "per_head" and kv_heads != heads:
        raise ConversionError(f"config.json says {kv_heads} KV heads, but this layout has one per head ({heads})")
    return Dims(layers, heads, kv_heads, head_dim, hidden)


def check_kv_heads(kv_heads: int, dims: Dims, family: str, spec: dict) -> None:
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
    if spec["kv_choices"] == "mha_or_mqa" and kv_heads not in (1, current):
        raise ConversionError(f"--kv-heads {kv_heads}: a {family} checkpoint in this layout can only become MHA "
                              f"(--kv-heads {current}) or MQA (--kv-heads 1); its architecture has no grouped-query form")


class _Roles:
    """Which source tensors play which attention role, found by matching the family's name templates."""

    def __init__(self, spec: dict, dims: Dims, config: dict, names: list[str]):
        self.spec, self.dims, self.config = spec, dims, config
        attention = re.escape(spec["attention"]).replace(r"\{layer\}", r"(?P<layer>\d+)")
        self.attention = re.compile(attention + r"\.(?P<rest>.+)$")
        self.patterns = {
            role: re.compile(re.escape(module).replace(r"\{head\}", r"(?P<head>\d+)") + r"\.(?P<param>weight|bias)$")
            for role, module in spec["tensors"].items()
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
        raise ConversionError(f"unexpected attention tensor {name}: this {self.spec['architectures'][0]} table "
                              f"knows {', '.join(self.spec['tensors'].values())}")

    def _check_complete(self) -> None:
        found: dict[tuple[int, str, str], set] = {}
        for role, layer, head, param in self.of.values():
            found.setdefault((layer, role, param), set()).add(head)
        needed = [r for r in self.spec["tensors"] if r in ("q", "k", "v", "o", "qkv")]
        for layer in range(self.dims.layers):
            for role in needed:
                if (layer, role, "weight") not in found:
                    name = self.spec["attention"].format(layer=layer) + "." + self.spec["tensors"][role] + ".weight"
                    raise ConversionError(f"the checkpoint has no {name}")
            for (lyr, role, param), heads in found.items():
                per_head = {"k_norm_per_head": self.dims.kv_heads, "q_norm_per_head": self.dims.heads}.get(role)
                if lyr == layer and per_head and heads != set(range(per_head)):
                    raise ConversionError(f"layer {layer}: {role} norms for heads {sorted(heads)}, "
                                          f"expected 0..{per_head - 1}")
        self._check_biases(found)

    def _check_biases(self, found: dict) -> None:
        for key, roles in (("qkv_bias", ("q", "k", "v", "qkv")), ("o_bias", ("o",))):
            rule = self.spec[key]
            for role in (r for r in roles if r in self.spec["tensors"]):
                has = {layer for (layer, r, p) in found if r == role and p == "bias"}
                expected = rule if isinstance(rule, bool) else self.config.get(rule)
                if expected is not None and has != (set(range(self.dims.layers)) if expected else set()):
                    what = "has" if has else "lacks"
                    raise ConversionError(f"the checkpoint {what} {self.spec['tensors'][role]} biases, but "
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
        numel = 1
        for s in shape:
            numel *= s
        ok = shape == expected if expected else numel in {
            "k_norm": (d.kv_heads * d.head_dim,), "q_norm": (d.head_dim, d.heads * d.head_dim)}[role]
        if not ok:
            want = expected if expected else f"{d.kv_heads if role == 'k_norm' else d.heads} x {d.head_dim} elements"
            raise ConversionError(f"{name} has shape {tuple(shape)}, but config.json implies {want} "
                                  f"({d.heads} heads, {d.kv_heads} KV heads, head_dim {d.head_dim}, hidden {d.hidden})")


def _out_dtype(src: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and src.is_floating_point else src


def plan_conversion(weights: WeightSource, config: dict, family: str, spec: dict, dims: Dims, kv_heads: int,
                    method: str, dtype: torch.dtype | None, seed: int) -> Plan:
    """Decide every output tensor (name, dtype, shape, producer) and the output config."""
    rename = spec.get("rename")
    canonical = renames.canonical_names(list(weights.tensors), rename)  # output name -> source name
    transposed = renames.transposed(canonical, rename)

    def meta_load(name: str) -> torch.Tensor:
        info = weights.tensors[canonical[name]]
        t = torch.empty(info.shape, dtype=info.dtype, device="meta")
        return t.t() if name in transposed else t

    def real_load(name: str) -> torch.Tensor:
        t = weights.read(canonical[name])
        return t.t() if name in transposed else t

    shapes = {name: tuple(meta_load(name).shape) for name in canonical}
    roles = _Roles(spec, dims, config, list(canonical))
    _check_shapes(roles, shapes)

    group_out = dims.kv_heads // kv_heads
    if spec["kv_choices"] == "mha_or_mqa" and kv_heads == 1 and dims.kv_heads != 1:
        out_layout = spec["mqa"]["layout"]
    else:
        out_layout = spec.get("mha_layout", spec["layout"])

    def merge(name: str, t: torch.Tensor, is_norm: bool = False, into: int = kv_heads) -> torch.Tensor:
        generator = None
        if method == "random" and not t.is_meta:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return merge_heads(t, into, method, generator, is_norm)

    def producer(name: str) -> tuple[str, Callable[[Loader], torch.Tensor]] | None:
        """(output name, transform) for a tensor that changes; None for one copied as is."""
        if name not in roles.of:
            return None
        role, _, head, param = roles.of[name]
        d = dims.head_dim
        if role in ("k", "v"):
            return name, lambda load: merge(name, load(name).reshape(dims.kv_heads, d, *shapes[name][1:])).reshape(
                kv_heads * d, *shapes[name][1:])
        if role == "qkv":
            def fused(load: Loader) -> torch.Tensor:
                q, k, v = layouts.split(spec["layout"], load(name), dims.heads, dims.kv_heads, d)
                return layouts.join(out_layout, q.float(), merge(name + ":k", k), merge(name + ":v", v))
            if out_layout == spec["layout"] and kv_heads == dims.kv_heads:
                return None
            return name, fused
        if role == "k_norm":
            shape = shapes[name]
            def pooled_norm(load: Loader) -> torch.Tensor:
                merged = merge(name, load(name).reshape(dims.kv_heads, -1), is_norm=True)
                return merged.reshape(*((kv_heads,) if len(shape) == 2 else ()), -1)
            return name, pooled_norm
        if role == "k_norm_per_head":
            if head % group_out:
                return "", lambda load: torch.empty(0)  # folded into the group's first head
            template = spec["attention"] + "." + spec["tensors"][role] + "." + param
            layer = roles.of[name][1]
            sources = [template.format(layer=layer, head=h) for h in range(head, head + group_out)]
            target = template.format(layer=layer, head=head // group_out)
            def pooled_heads(load: Loader) -> torch.Tensor:
                blocks = [load(s) for s in sources]
                if blocks[0].is_meta:  # planning: shape only
                    return blocks[0].float()
                return merge(name, torch.stack(blocks), is_norm=True, into=1)[0]
            return target, pooled_heads
        return None

    order = sorted(canonical, key=lambda n: (str(weights.tensors[canonical[n]].file), weights.tensors[canonical[n]].start))
    out: list[OutTensor] = []
    changed: list[str] = []
    for name in order:
        src_info = weights.tensors[canonical[name]]
        target_dtype = _out_dtype(src_info.dtype, dtype)
        made = producer(name)
        if made is None:
            if name in transposed or target_dtype != src_info.dtype:
                made = (name, lambda load, name=name: load(name))
            else:
                out.append(OutTensor(name, src_info.dtype, shapes[name],
                                     lambda fh, src=canonical[name]: weights.copy_raw(src, fh)))
                continue
        else:
            changed.append(name)
        target, transform = made
        if not target:
            continue
        shape = tuple(transform(meta_load).shape)
        out.append(OutTensor(target, target_dtype, shape, _computed(transform, real_load, target_dtype, shape)))
    new_config = output_config(config, spec, dims, kv_heads, dtype)
    return Plan(out, new_config, {}, changed)


def _computed(transform: Callable[[Loader], torch.Tensor], load: Loader, dtype: torch.dtype, shape: tuple):
    def write(fh) -> None:
        tensor = transform(load).to(dtype)
        if tuple(tensor.shape) != shape:
            raise RuntimeError(f"internal error: made shape {tuple(tensor.shape)}, planned {shape}")
        write_tensor_bytes(tensor, fh)
    return write


def output_config(config: dict, spec: dict, dims: Dims, kv_heads: int, dtype: torch.dtype | None) -> dict:
    """The source's config.json with only the KV-head key(s) changed (and the dtype, when --dtype asks)."""
    new = copy.deepcopy(config)
    if spec.get("rename"):
        new = renames.derive_config(spec["rename"]["config"], new, kv_heads)
    aliases = spec["config"]["kv_heads"]
    present = [k for k in aliases if k in new]
    for key in present:
        new[key] = kv_heads
    if not present and aliases and kv_heads != dims.kv_heads and spec["kv_choices"] == "divisors":
        new[aliases[0]] = kv_heads
    if spec["kv_choices"] == "mha_or_mqa" and kv_heads == 1 and dims.kv_heads != 1:
        new.update(spec["mqa"]["config"])
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in new:
                new[key] = str(dtype).removeprefix("torch.")
    return new


def _kv_bytes(dims: Dims, kv_heads: int, itemsize: int) -> int:
    return 2 * dims.layers * kv_heads * dims.head_dim * itemsize


def build_report(source: str, output: Path, family: str, spec: dict, dims: Dims, kv_heads: int, method: str,
                 weights: WeightSource, plan: Plan) -> dict[str, Any]:
    """The facts of a conversion, as written to conversion.json and printed."""
    params_before = sum(_numel(i.shape) for i in weights.tensors.values())
    params_after = sum(_numel(t.shape) for t in plan.tensors)
    # The KV cache holds activations in the model's float dtype.
    src_dtype = next((i.dtype for i in weights.tensors.values() if i.dtype.is_floating_point), torch.float32)
    out_dtype = next((t.dtype for t in plan.tensors if t.dtype.is_floating_point), src_dtype)
    before = _kv_bytes(dims, dims.kv_heads, src_dtype.itemsize)
    after = _kv_bytes(dims, kv_heads, out_dtype.itemsize)
    return {
        "tool": f"kvshrink {VERSION}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "output": str(output),
        "family": family,
        "architecture": plan.config.get("architectures", [None])[0],
        "method": method,
        "dtype_before": str(src_dtype).removeprefix("torch."),
        "dtype_after": str(out_dtype).removeprefix("torch."),
        "layers": dims.layers,
        "heads": dims.heads,
        "head_dim": dims.head_dim,
        "kv_heads_before": dims.kv_heads,
        "kv_heads_after": kv_heads,
        "kv_heads_per_layer": [[dims.kv_heads, kv_heads] for _ in range(dims.layers)],
        "kv_cache_bytes_per_token_before": before,
        "kv_cache_bytes_per_token_after": after,
        "kv_cache_bytes_4k_context_before": before * 4096,
        "kv_cache_bytes_4k_context_after": after * 4096,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "changed_tensors": sorted(plan.changed),
        "note": spec.get("note"),
        "tensor_bytes_after": sum(t.nbytes for t in plan.tensors),
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, chat template, generation config and the like: every top-level file that is not weights."""
    copied = []
    for path in sorted(source.iterdir()):
        if (path.name in _WRITTEN_HERE or path.name.startswith(".") or _NOT_COPIED.search(path.name)
                or not path.is_file()):
            continue
        shutil.copyfile(path, target / path.name)  # follows hub-cache symlinks
        copied.append(path.name)
    return copied


def model_card(report: dict[str, Any], command: str) -> str:
    kind = "MQA" if report["kv_heads_after"] == 1 else ("MHA" if report["kv_heads_after"] == report["heads"] else "GQA")
    return f"""---
base_model: {report['source']}
tags:
- kvshrink
- {kind.lower()}
---
# {report['family']} converted to {kind} ({report['kv_heads_after']} KV heads)

Converted from `{report['source']}` by {report['tool']} on {report['date'][:10]}.

- Command: `{command}`
- Method: `{report['method']}`
- KV heads per layer: {report['kv_heads_before']} -> {report['kv_heads_after']} ({report['heads']} query heads, head_dim {report['head_dim']}, {report['layers']} layers)
- KV cache per token: {report['kv_cache_bytes_per_token_before']:,} -> {report['kv_cache_bytes_per_token_after']:,} bytes
- Parameters: {report['parameters_before']:,} -> {report['parameters_after']:,}
- Tensors changed: {len(report['changed_tensors'])} (listed in conversion.json); every other tensor is copied unchanged.

Merging KV heads costs quality until the model is trained a little ("uptraining", as in the GQA paper,
Ainslie et al. 2023); measure perplexity before relying on this checkpoint.
"""


def convert_checkpoint(source: str | Path, output: str | Path, kv_heads: int, method: str = "mean",
                       dtype: str = "auto", max_shard_size: str | int = "5GB", overwrite: bool = False,
                       dry_run: bool = False, allow_pickle: bool = False, seed: int = 0,
                       progress: bool = False, command: str | None = None) -> dict[str, Any]:
    """Convert a checkpoint to ``kv_heads`` KV heads and return the report.

    Args:
        source: a local checkpoint directory or a hub id.
        output: the new checkpoint's directory (created atomically).
        kv_heads: the KV-head count wanted; it must divide the source's.
        method: ``mean``, ``first`` or ``random`` (see ``convert.merge``).
        dtype: ``auto`` (keep the source's) or ``bfloat16``/``float16``/``float32``.
        max_shard_size: bytes, or a size like ``5GB``.
        overwrite: replace a non-empty OUTPUT.
        dry_run: validate and plan, write nothing.
        allow_pickle: accept ``pytorch_model.bin`` (loaded with ``weights_only=True``).
        seed: the random source of ``method="random"``.
        progress: show a progress bar.
        command: the command line, for the model card.

    Returns:
        The report (also written to OUTPUT/conversion.json).

    Raises:
        ConversionError: bad input; nothing is written.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ConversionError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    src_dir = resolve_source(str(source))
    output = Path(output)
    check_output(output, src_dir, overwrite)
    config = read_config(src_dir)
    try:
        family, spec = families.resolve(config)
    except KeyError as exc:
        raise ConversionError(f"model type {exc.args[0]!r} is not supported; supported families: "
                              f"{', '.join(families.supported())}") from None
    dims = read_dims(config, spec)
    check_kv_heads(kv_heads, dims, family, spec)
    weights = open_weights(src_dir, allow_pickle)
    plan = plan_conversion(weights, config, family, spec, dims, kv_heads, method, DTYPES[dtype], seed)
    report = build_report(str(source), output, family, spec, dims, kv_heads, method, weights, plan)
    shards = shard_plan(plan.tensors, max_bytes)
    report["shards"] = len(shards)
    report["dry_run"] = dry_run
    if dry_run:
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report
    command = command or f"convert_checkpoint({str(source)!r}, {str(output)!r}, kv_heads={kv_heads}, method={method!r})"
    with AtomicDirectory(output) as tmp:
        names = shard_names(len(shards))
        bar = _progress_bar(report["tensor_bytes_after"], progress)
        for shard, file in zip(shards, names):
            write_shard(tmp / file, shard)
            bar.update(sum(t.nbytes for t in shard))
        bar.close()
        if len(shards) > 1:
            write_index(tmp, shards, names)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        report["copied_files"] = copy_side_files(src_dir, tmp)
        report["output_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        report["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / "README.md").write_text(model_card(report, command))
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not enabled or None, leave=False)
