"""The converter's entry point: validate, plan, then stream the new checkpoint into place atomically."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from convert import families
from convert.errors import ConversionError
from convert.merge import METHODS
from convert.plan import check_kv_heads, plan_conversion, read_dims
from convert.report import build_report, model_card
from convert.source import open_weights, read_config, resolve_source
from convert.writer import AtomicDirectory, check_output, parse_size, shard_names, shard_plan, write_index, write_shard

DTYPES = {"auto": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.onnx|\.index\.json)$")
_WRITTEN_HERE = {"config.json", "README.md", "conversion.json", ".gitattributes"}


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
    src_dir = resolve_source(str(source), allow_pickle)
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
    plan = plan_conversion(weights, config, spec, dims, kv_heads, method, DTYPES[dtype], seed)
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
            write_shard(tmp / file, shard, bar.update)
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
