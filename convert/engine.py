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
from convert.calibrate import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, attention_moments, read_text
from convert.merge import GROUPINGS, METHODS, calibrated_names
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
                       progress: bool = False, command: str | None = None, grouping: str = "contiguous",
                       calibration_data: list[str] | None = None, calibration_tokens: int = DEFAULT_TOKENS,
                       calibration_seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, Any]:
    """Convert a checkpoint to ``kv_heads`` KV heads and return the report.

    Args:
        source: a local checkpoint directory or a hub id.
        output: the new checkpoint's directory (created atomically).
        kv_heads: the KV-head count wanted; it must divide the source's.
        method: ``mean``, ``first``, ``random`` (see ``convert.merge``) or ``svd`` (activation-aware,
            folds into Q and O; needs ``calibration_data``; see ``convert.attention``).
        dtype: ``auto`` (keep the source's) or ``bfloat16``/``float16``/``float32``.
        max_shard_size: bytes, or a size like ``5GB``.
        overwrite: replace a non-empty OUTPUT.
        dry_run: validate and plan, write nothing.
        allow_pickle: accept ``pytorch_model.bin`` (loaded with ``weights_only=True``).
        seed: the random source of ``method="random"``.
        progress: show a progress bar.
        command: the command line, for the model card.
        grouping: ``contiguous`` (neighbouring KV heads merge, as in the GQA paper) or ``similarity``
            (heads are permuted so that the most alike merge; see ``convert.attention``).
        calibration_data: text files (.txt, .jsonl) the source model runs on to weigh the merge
            (``svd``; with ``similarity`` grouping it also weighs the choice of groups).
        calibration_tokens: how many calibration tokens to run.
        calibration_seq_len: tokens per forward pass.

    Returns:
        The report (also written to OUTPUT/conversion.json).

    Raises:
        ConversionError: bad input; nothing is written.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise ConversionError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if grouping not in GROUPINGS:
        raise ConversionError(f"--grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    if METHODS[method].calibrated and not calibration_data:
        raise ConversionError(f"--method {method} needs --calibration-data FILE... (text the model runs on)")
    if calibration_data and not METHODS[method].calibrated and not GROUPINGS[grouping].permutes:
        raise ConversionError(f"--calibration-data is used by --method {'/'.join(calibrated_names())} or --grouping "
                              f"similarity, not by --method {method} with {grouping} groups")
    if calibration_tokens < 1 or calibration_seq_len < 1:
        raise ConversionError("--calibration-tokens and --calibration-seq-len must be positive")
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
    plan = plan_conversion(weights, config, spec, dims, kv_heads, method, DTYPES[dtype], seed, grouping)
    report = build_report(str(source), output, family, spec, dims, kv_heads, method, weights, plan)
    report["grouping"] = grouping
    if plan.layers and plan.layers.k_normed and METHODS[method].k_normed_note:
        report["k_merge"] = METHODS[method].k_normed_note
    if calibration_data:
        documents = read_text(calibration_data)  # unreadable or empty text fails here, dry run included
        report["calibration"] = {"files": [str(f) for f in calibration_data], "tokens_wanted": calibration_tokens}
    shards = shard_plan(plan.tensors, max_bytes)
    report["shards"] = len(shards)
    report["dry_run"] = dry_run
    if dry_run:
        report["seconds"] = round(time.perf_counter() - started, 3)
        return report
    check_free_space(output, report["tensor_bytes_after"])
    command = command or f"convert_checkpoint({str(source)!r}, {str(output)!r}, kv_heads={kv_heads}, method={method!r})"
    if calibration_data and plan.layers:
        found = attention_moments(src_dir, plan.layers.modules, documents, calibration_tokens,
                                  calibration_seq_len, progress)
        plan.layers.moments = found["moments"]
        report["calibration"].update(tokens=found["tokens"], seconds=found["seconds"])
    with AtomicDirectory(output) as tmp:
        names = shard_names(len(shards))
        bar = _progress_bar(report["tensor_bytes_after"], progress)
        for shard, file in zip(shards, names):
            write_shard(tmp / file, shard, bar.update)
        bar.close()
        if len(shards) > 1:
            write_index(tmp, shards, names)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        if plan.layers and GROUPINGS[grouping].permutes:
            report["kv_head_order"] = [plan.layers.orders[n] for n in sorted(plan.layers.orders)]
        report["copied_files"] = copy_side_files(src_dir, tmp)
        report["output_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        report["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / "README.md").write_text(model_card(report, command))
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_free_space(output: Path, tensor_bytes: int) -> None:
    """Refuse before writing when OUTPUT's filesystem has less free space than the tensors need (plus 1%)."""
    parent = output.absolute()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    needed = int(tensor_bytes * 1.01)
    if free < needed:
        raise ConversionError(f"{output}: the converted tensors need {needed:,} bytes but its filesystem has only "
                              f"{free:,} free; free space or choose another OUTPUT")


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not enabled or None, leave=False)
