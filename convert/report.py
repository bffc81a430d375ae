"""The report of a conversion: what conversion.json holds, what is printed, and the model card."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from convert.families import resolve
from convert.plan import Dims, Plan, read_dims
from convert.source import DTYPES as TENSOR_DTYPES
from convert.source import FLOATS, WeightSource

VERSION = "0.1.0"


def _kv_bytes(dims: Dims, kv_heads: int, itemsize: int) -> int:
    return 2 * dims.layers * kv_heads * dims.head_dim * itemsize


def kv_cache_bytes_per_token(config: dict[str, Any], itemsize: int) -> tuple[int, int]:
    """(KV heads, KV-cache bytes per token) of a model: layers x 2 (K, V) x kv_heads x head_dim x itemsize.

    Args:
        config: the model's config.json as a dict.
        itemsize: bytes per cached value (4 for float32, 2 for bfloat16/float16).

    Raises KeyError for a family the converter does not know, ConversionError for an inconsistent config.
    """
    dims = read_dims(config, resolve(config)[1])
    return dims.kv_heads, _kv_bytes(dims, dims.kv_heads, itemsize)


def build_report(source: str, output: Path, family: str, spec: dict, dims: Dims, kv_heads: int, method: str,
                 weights: WeightSource, plan: Plan) -> dict[str, Any]:
    """The facts of a conversion, as written to conversion.json and printed."""
    params_before = sum(math.prod(i.shape) for i in weights.tensors.values())
    params_after = sum(math.prod(t.shape) for t in plan.tensors)
    # The KV cache holds activations in the model's float dtype.
    src_dtype = next((i.dtype for i in weights.tensors.values() if i.dtype in FLOATS), "F32")
    out_dtype = next((t.dtype for t in plan.tensors if t.dtype in FLOATS), src_dtype)
    before = _kv_bytes(dims, dims.kv_heads, TENSOR_DTYPES[src_dtype][0])
    after = _kv_bytes(dims, kv_heads, TENSOR_DTYPES[out_dtype][0])
    return {
        "tool": f"kvshrink {VERSION}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "output": str(output),
        "family": family,
        "architecture": plan.config.get("architectures", [None])[0],
        "method": method,
        "dtype_before": TENSOR_DTYPES[src_dtype][1],
        "dtype_after": TENSOR_DTYPES[out_dtype][1],
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
        "changed_tensors": plan.changed,
        "note": spec.get("note"),
        "tensor_bytes_after": sum(t.nbytes for t in plan.tensors),
    }


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
- KV heads per layer: {report['kv_heads_before']} -> {report['kv_heads_after']} \
({report['heads']} query heads, head_dim {report['head_dim']}, {report['layers']} layers)
- KV cache per token: {report['kv_cache_bytes_per_token_before']:,} -> \
{report['kv_cache_bytes_per_token_after']:,} bytes
- Parameters: {report['parameters_before']:,} -> {report['parameters_after']:,}
- Tensors changed: {len(report['changed_tensors'])} (listed in conversion.json); every other tensor is copied unchanged.

Merging KV heads costs quality until the model is trained a little ("uptraining", as in the GQA paper,
Ainslie et al. 2023); measure perplexity before relying on this checkpoint.
"""


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    raise AssertionError


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a conversion."""
    r = report
    per_layer = {tuple(x) for x in r["kv_heads_per_layer"]}
    layers = (f"all {r['layers']} layers: {r['kv_heads_before']} -> {r['kv_heads_after']}" if len(per_layer) == 1
              else ", ".join(f"{i}: {a} -> {b}" for i, (a, b) in enumerate(r["kv_heads_per_layer"])))
    ratio = r["kv_cache_bytes_per_token_before"] / r["kv_cache_bytes_per_token_after"]
    lines = [
        f"{'plan (dry run, nothing written)' if r['dry_run'] else 'converted'}: {r['source']} -> {r['output']}",
        f"  family            {r['family']} -> {r['architecture']}, method {r['method']}, "
        f"{r['dtype_before']} -> {r['dtype_after']}",
        f"  KV heads          {layers} ({r['heads']} query heads, head_dim {r['head_dim']})",
        f"  KV cache / token  {_bytes(r['kv_cache_bytes_per_token_before'])} -> "
        f"{_bytes(r['kv_cache_bytes_per_token_after'])} ({ratio:.1f}x smaller)",
        f"  KV cache, 4k ctx  {_bytes(r['kv_cache_bytes_4k_context_before'])} -> "
        f"{_bytes(r['kv_cache_bytes_4k_context_after'])} (batch 1)",
        f"  parameters        {r['parameters_before']:,} -> {r['parameters_after']:,}",
        f"  tensors changed   {len(r['changed_tensors'])} "
        f"({', '.join(sorted({n.rsplit('.', 2)[-2] for n in r['changed_tensors']}))})",
        f"  output size       {_bytes(r.get('output_bytes', r['tensor_bytes_after']))} in {r['shards']} shard(s)",
        f"  time              {r['seconds']:.2f} s",
    ]
    if r.get("grouping", "contiguous") != "contiguous":
        lines.append(f"  grouping          {r['grouping']}: KV-head order per layer in conversion.json")
    if r.get("calibration"):
        c = r["calibration"]
        ran = f"{c['tokens']:,} tokens in {c['seconds']:.1f} s" if "tokens" in c else f"{c['tokens_wanted']:,} tokens"
        lines.append(f"  calibration       {ran} of {', '.join(Path(f).name for f in c['files'])}")
    if r.get("k_merge"):
        lines.append(f"  K merge           {r['k_merge']}")
    if r["dry_run"]:
        names = r["changed_tensors"]
        more = f", ... ({len(names)} in all)" if len(names) > 6 else ""
        lines.append("  would change      " + ", ".join(names[:6]) + more)
    if r.get("note"):
        lines.append(f"  note              {r['note']}")
    return "\n".join(lines)
