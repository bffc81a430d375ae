"""The report of a conversion: what conversion.json holds, what is printed, and the model card."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.families import Family
from convert.merge import METHODS
from convert.options import ConvertOptions
from convert.plan import Dims, Plan
from convert.source import DTYPES as TENSOR_DTYPES
from convert.source import FLOATS, WeightSource

VERSION = "0.1.0"


def kv_cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes one token adds to the KV cache: a key and a value of ``head_dim`` per KV head and layer."""
    return 2 * layers * kv_heads * head_dim * itemsize


def config_kv_cache(config: dict[str, Any], itemsize: int) -> tuple[int, int]:
    """(KV heads, KV-cache bytes per token) of a model's config.json at ``itemsize`` bytes per cached value.

    Raises:
        ConversionError: a family this project does not know, or an inconsistent config.
    """
    from convert import families
    from convert.errors import ConversionError
    from convert.plan import read_dims

    try:
        spec = families.resolve(config)[1]
    except KeyError as exc:
        raise ConversionError(f"model type {exc.args[0]!r} is not one this project knows") from None
    dims = read_dims(config, spec)
    return dims.kv_heads, kv_cache_bytes_per_token(dims.layers, dims.kv_heads, dims.head_dim, itemsize)


def checkpoint_kv_cache(directory: Path) -> tuple[int, int]:
    """(KV heads, KV-cache bytes per token) of a checkpoint, from its config.json (the dtype it declares)."""
    from convert.source import read_config

    config = read_config(Path(directory))
    torch_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    itemsize = next((size for size, name in TENSOR_DTYPES.values() if name == torch_name), 4)
    return config_kv_cache(config, itemsize)


@dataclass
class ConversionReport:
    """The facts of a conversion: written to conversion.json (``to_json``), printed, and put in the model card."""

    tool: str
    date: str
    source: str
    output: str
    family: str
    architecture: str | None
    method: str
    grouping: str
    dtype_before: str
    dtype_after: str
    layers: int
    heads: int
    head_dim: int
    kv_heads_before: int
    kv_heads_after: int
    kv_heads_per_layer: list[list[int]]
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    kv_cache_bytes_4k_context_before: int
    kv_cache_bytes_4k_context_after: int
    parameters_before: int
    parameters_after: int
    changed_tensors: list[str]
    note: str | None
    tensor_bytes_after: int
    shards: int
    dry_run: bool
    k_merge: str | None = None  # what the method did to K where it could not fold a mix (qk-norm families)
    calibration: dict[str, Any] | None = None  # files, tokens_wanted; tokens and seconds once run
    kv_head_order: list[list[int]] | None = None  # per layer, for permuting groupings
    copied_files: list[str] = field(default_factory=list)
    output_bytes: int | None = None
    seconds: float = 0.0
    base_model: str | None = None  # the source's hub id, when it has one (the model card's base_model)

    def to_json(self) -> str:
        """conversion.json: every field, the optional ones only when set."""
        optional = {"k_merge", "calibration", "kv_head_order", "output_bytes", "base_model"}
        data = {k: v for k, v in dataclasses.asdict(self).items() if not (k in optional and v is None)}
        return json.dumps(data, indent=2) + "\n"


def build_report(
    source: str,
    output: Path,
    family: str,
    spec: Family,
    dims: Dims,
    options: ConvertOptions,
    weights: WeightSource,
    plan: Plan,
    shards: int,
    dry_run: bool,
) -> ConversionReport:
    """The facts of a conversion known before writing (the rest is filled in as it runs)."""
    params_before = sum(math.prod(i.shape) for i in weights.tensors.values())
    params_after = sum(math.prod(t.shape) for t in plan.tensors)
    # The KV cache holds activations in the model's float dtype.
    src_dtype = next((i.dtype for i in weights.tensors.values() if i.dtype in FLOATS), "F32")
    out_dtype = next((t.dtype for t in plan.tensors if t.dtype in FLOATS), src_dtype)
    kv_heads = options.kv_heads
    before = kv_cache_bytes_per_token(dims.layers, dims.kv_heads, dims.head_dim, TENSOR_DTYPES[src_dtype][0])
    after = kv_cache_bytes_per_token(dims.layers, kv_heads, dims.head_dim, TENSOR_DTYPES[out_dtype][0])
    merge = METHODS[options.method]
    calibration = None
    if options.calibrates:
        calibration = {
            "files": [str(f) for f in options.calibration_data or []],
            "sampled": not options.calibration_data,
            "tokens_wanted": options.calibration_tokens,
        }
    return ConversionReport(
        tool=f"kvshrink {VERSION}",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=str(source),
        output=str(output),
        family=family,
        architecture=plan.config.get("architectures", [None])[0],
        method=options.method,
        grouping=options.grouping,
        dtype_before=TENSOR_DTYPES[src_dtype][1],
        dtype_after=TENSOR_DTYPES[out_dtype][1],
        layers=dims.layers,
        heads=dims.heads,
        head_dim=dims.head_dim,
        kv_heads_before=dims.kv_heads,
        kv_heads_after=kv_heads,
        kv_heads_per_layer=[[dims.kv_heads, kv_heads] for _ in range(dims.layers)],
        kv_cache_bytes_per_token_before=before,
        kv_cache_bytes_per_token_after=after,
        kv_cache_bytes_4k_context_before=before * 4096,
        kv_cache_bytes_4k_context_after=after * 4096,
        parameters_before=params_before,
        parameters_after=params_after,
        changed_tensors=plan.changed,
        note=spec.note,
        tensor_bytes_after=sum(t.nbytes for t in plan.tensors),
        shards=shards,
        dry_run=dry_run,
        k_merge=merge.k_normed_note if plan.layers and plan.layers.k_normed else None,
        calibration=calibration,
    )


def model_card(report: ConversionReport, command: str) -> str:
    kind = "MQA" if report.kv_heads_after == 1 else ("MHA" if report.kv_heads_after == report.heads else "GQA")
    base = f"base_model: {report.base_model}\n" if report.base_model else ""  # a hub id, never a local path
    return f"""---
{base}tags:
- kvshrink
- {kind.lower()}
---
# {report.family} converted to {kind} ({report.kv_heads_after} KV heads)

Converted from `{report.source}` by {report.tool} on {report.date[:10]}.

- Command: `{command}`
- Method: `{report.method}`
- KV heads per layer: {report.kv_heads_before} -> {report.kv_heads_after} \
({report.heads} query heads, head_dim {report.head_dim}, {report.layers} layers)
- KV cache per token: {report.kv_cache_bytes_per_token_before:,} -> \
{report.kv_cache_bytes_per_token_after:,} bytes
- Parameters: {report.parameters_before:,} -> {report.parameters_after:,}
- Tensors changed: {len(report.changed_tensors)} (listed in conversion.json); every other tensor is copied unchanged.

Merging KV heads costs quality until the model is trained a little ("uptraining", as in the GQA paper,
Ainslie et al. 2023); measure perplexity before relying on this checkpoint.
"""


def _bytes(n: int) -> str:
    """A byte count in decimal units: ``1,234 B``, ``12.35 MB``."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.2f} {unit}"
        size /= 1000
    return f"{size:,.2f} TB"


def format_report(report: ConversionReport) -> str:
    """The human-readable summary printed at the end of a conversion."""
    r = report
    per_layer = {tuple(x) for x in r.kv_heads_per_layer}
    layers = (
        f"all {r.layers} layers: {r.kv_heads_before} -> {r.kv_heads_after}"
        if len(per_layer) == 1
        else ", ".join(f"{i}: {a} -> {b}" for i, (a, b) in enumerate(r.kv_heads_per_layer))
    )
    ratio = r.kv_cache_bytes_per_token_before / r.kv_cache_bytes_per_token_after
    lines = [
        f"{'plan (dry run, nothing written)' if r.dry_run else 'converted'}: {r.source} -> {r.output}",
        f"  family            {r.family} -> {r.architecture}, method {r.method}, {r.dtype_before} -> {r.dtype_after}",
        f"  KV heads          {layers} ({r.heads} query heads, head_dim {r.head_dim})",
        f"  KV cache / token  {_bytes(r.kv_cache_bytes_per_token_before)} -> "
        f"{_bytes(r.kv_cache_bytes_per_token_after)} ({ratio:.1f}x smaller)",
        f"  KV cache, 4k ctx  {_bytes(r.kv_cache_bytes_4k_context_before)} -> "
        f"{_bytes(r.kv_cache_bytes_4k_context_after)} (batch 1)",
        f"  parameters        {r.parameters_before:,} -> {r.parameters_after:,}",
        f"  tensors changed   {len(r.changed_tensors)} "
        f"({', '.join(sorted({n.rsplit('.', 2)[-2] for n in r.changed_tensors}))})",
        f"  output size       {_bytes(r.output_bytes or r.tensor_bytes_after)} in {r.shards} shard(s)",
        f"  time              {r.seconds:.2f} s",
    ]
    if r.grouping != "contiguous":
        lines.append(f"  grouping          {r.grouping}: KV-head order per layer in conversion.json")
    if r.calibration:
        c = r.calibration
        ran = f"{c['tokens']:,} tokens in {c['seconds']:.1f} s" if "tokens" in c else f"{c['tokens_wanted']:,} tokens"
        text = "text sampled from the source" if c.get("sampled") else ", ".join(Path(f).name for f in c["files"])
        lines.append(f"  calibration       {ran} of {text}")
        if c.get("memory"):
            lines.append(f"  calibration peak  {c['memory']}")
        if c.get("memory_advice"):
            lines.append(f"  warning           {c['memory_advice']}")
    if r.k_merge:
        lines.append(f"  K merge           {r.k_merge}")
    if r.dry_run:
        names = r.changed_tensors
        more = f", ... ({len(names)} in all)" if len(names) > 6 else ""
        lines.append("  would change      " + ", ".join(names[:6]) + more)
    if r.note:
        lines.append(f"  note              {r.note}")
    return "\n".join(lines)
