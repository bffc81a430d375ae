"""The converter's entry point: validate, plan, then stream the new checkpoint into place atomically."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert import families
from convert.calibrate import (
    calibrate_layers,
    check_model_fits,
    layer_dtype,
    load_tokenizer,
    memory_estimate,
    read_text,
    sampled_documents,
    token_blocks,
)
from convert.device import available_ram, free_bytes
from convert.errors import ConversionError
from convert.layers import LayerPlan, Spill
from convert.merge import GROUPINGS
from convert.onload import LayerLoader, check_positions
from convert.options import DTYPES, ConvertOptions
from convert.plan import Plan, check_kv_heads, plan_conversion, read_dims
from convert.report import ConversionReport, build_report, model_card
from convert.source import WeightSource, hub_id, open_weights, read_config, resolve_source
from convert.writer import OutTensor, check_output, parse_size, shard_names, shard_plan, write_index, write_shard
from kvshrink_base.atomic import AtomicDirectory
from kvshrink_base.device import pick_device

if TYPE_CHECKING:
    import torch
    from tqdm.auto import tqdm

_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.onnx|\.index\.json)$")
_WRITTEN_HERE = {"config.json", "README.md", "conversion.json", ".gitattributes"}


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, chat template, generation config and the like: every top-level file that is not weights."""
    copied = []
    for path in sorted(source.iterdir()):
        if (
            path.name in _WRITTEN_HERE
            or path.name.startswith(".")
            or _NOT_COPIED.search(path.name)
            or not path.is_file()
        ):
            continue
        shutil.copyfile(path, target / path.name)  # follows hub-cache symlinks
        copied.append(path.name)
    return copied


@dataclass
class _Prepared:
    """A validated, planned conversion, nothing written yet."""

    src_dir: Path
    plan: Plan
    report: ConversionReport
    shards: list[list[OutTensor]]
    weights: WeightSource
    blocks: torch.Tensor | None  # the calibration token blocks (n, seq_len), None until sampled or when not calibrating


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    options: ConvertOptions | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    command: str | None = None,
    **fields: Any,
) -> ConversionReport:
    """Convert a checkpoint to ``options.kv_heads`` KV heads and return the report.

    Args:
        source: a local checkpoint directory or a hub id.
        output: the new checkpoint's directory (created atomically).
        options: what to produce (``convert.options.ConvertOptions``); or give its fields as keywords:
            ``convert_checkpoint(src, out, kv_heads=1, method="mean")``.
        overwrite: replace a non-empty OUTPUT.
        dry_run: validate and plan, write nothing.
        progress: show progress bars.
        command: the command line, for the model card.

    Returns:
        The report (also written to OUTPUT/conversion.json).

    Raises:
        ConversionError: bad input; nothing is written.
    """
    started = time.perf_counter()
    if options is None:
        unknown = set(fields) - set(ConvertOptions.fields())
        if unknown:
            raise TypeError(f"convert_checkpoint() got unknown options {sorted(unknown)}")
        options = ConvertOptions(**fields)
    elif fields:
        raise TypeError("give either options or its fields as keywords, not both")
    prepared = _prepare(str(source), Path(output), options, overwrite, dry_run)
    report = prepared.report
    if not dry_run:
        check_free_space(Path(output), report.tensor_bytes_after)
        command = command or f"convert_checkpoint({str(source)!r}, {str(output)!r}, {options!r})"
        with contextlib.ExitStack() as stack:
            if options.calibrates and prepared.plan.layers is not None:
                work = stack.enter_context(_work_directory(Path(output)))
                _calibrate(prepared, options, Path(work), progress)
            _write(prepared, Path(output), options, progress, command, started)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _work_directory(output: Path) -> tempfile.TemporaryDirectory[str]:
    """A hidden temporary directory beside OUTPUT (the calibrated layers' spill), removed however the run ends
    (SIGKILL aside: then, like the atomic output's, a hidden ``.OUTPUT.tmp-*`` sibling remains)."""
    return tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-calibration-", dir=output.absolute().parent)


def _prepare(source: str, output: Path, options: ConvertOptions, overwrite: bool, dry_run: bool) -> _Prepared:
    """Validate everything and plan every output tensor, reading no tensor data."""
    options.validate()
    max_bytes = parse_size(options.max_shard_size)
    src_dir = resolve_source(source, options.allow_pickle)
    check_output(output, src_dir, overwrite)
    config = read_config(src_dir)
    try:
        family, spec = families.resolve(config)
    except KeyError as exc:
        raise ConversionError(
            f"model type {exc.args[0]!r} is not supported; supported families: {', '.join(families.supported())}"
        ) from None
    dims = read_dims(config, spec)
    check_kv_heads(options.kv_heads, dims, family, spec)
    weights = open_weights(src_dir, options.allow_pickle)
    plan = plan_conversion(
        weights,
        config,
        spec,
        dims,
        options.kv_heads,
        options.method,
        DTYPES[options.dtype],
        options.seed,
        options.grouping,
    )
    shards = shard_plan(plan.tensors, max_bytes)
    report = build_report(source, output, family, spec, dims, options, weights, plan, len(shards), dry_run)
    report.base_model = hub_id(source, src_dir)
    blocks = None
    if plan.layers is not None and report.calibration is not None:  # the report has it where the options calibrate
        blocks = _check_calibration(src_dir, weights, plan.layers, report.calibration, options)
    return _Prepared(src_dir, plan, report, shards, weights, blocks)


def _check_calibration(
    src_dir: Path, weights: WeightSource, layers: LayerPlan, calibration: dict[str, Any], options: ConvertOptions
) -> torch.Tensor | None:
    """Everything calibration needs, checked before any work (dry run included): the device, the tokenizer, the
    text (tokenized here) or room to sample it, and the skeleton's layer names; the memory estimate goes in the
    report's ``calibration``. Returns the token blocks (None where they are still to be sampled)."""
    device = pick_device(options.device)
    loader = LayerLoader(
        src_dir,
        weights,
        [layers.source_names[a] for a in layers.anchors],
        device,
        layer_dtype(weights, layers, device),
        materialize=False,
    )
    warning = check_positions(loader.model, min(options.calibration_seq_len, options.calibration_tokens))
    documents = read_text(options.calibration_data, options.calibration_tokens) if options.calibration_data else None
    tokenizer = load_tokenizer(src_dir)
    blocks = None
    if documents is not None:  # unreadable, empty or too short text fails here
        blocks = token_blocks(
            tokenizer, documents, options.calibration_tokens, options.calibration_seq_len, options.calibration_bos
        )
    else:
        check_model_fits(weights, device)
    tokens = blocks.numel() if blocks is not None else options.calibration_tokens
    memory = memory_estimate(loader, layers, tokens, options, device, sampled=blocks is None)
    calibration["memory"] = memory.line()
    advice = memory.advice(free_bytes(device), available_ram())
    if advice:
        calibration["memory_advice"] = advice
    if warning:  # once everything else is checked: a bad input's error stays the only line
        print(f"warning: {warning}", file=sys.stderr)
    return blocks


def _calibrate(prepared: _Prepared, options: ConvertOptions, work: Path, progress: bool) -> None:
    """Run the source on the calibration text layer by layer; every rewritten layer lands in the spill."""
    plan, blocks, calibration = prepared.plan, prepared.blocks, prepared.report.calibration
    if plan.layers is None or plan.load is None or calibration is None:
        raise ValueError("calibration needs the plan's layers and the report's calibration")
    if blocks is None:
        documents = sampled_documents(
            prepared.src_dir, prepared.weights, options.calibration_tokens, options.device, progress
        )
        blocks = token_blocks(
            load_tokenizer(prepared.src_dir),
            documents,
            options.calibration_tokens,
            options.calibration_seq_len,
            options.calibration_bos,
        )
    plan.state.spill = Spill(work)
    found = calibrate_layers(
        prepared.src_dir, prepared.weights, plan.layers, plan.state, plan.load, blocks, options, progress
    )
    calibration.update(
        order=options.calibration_order,
        refit_o=options.refit_o,
        local_steps=options.local_steps,
        tokens=found["tokens"],
        seconds=found["seconds"],
        device=found["device"],
        stages=found["stages"],
    )


def _write(
    prepared: _Prepared, output: Path, options: ConvertOptions, progress: bool, command: str, started: float
) -> None:
    """Stream the shards, config, side files, model card and report into OUTPUT, atomically."""
    plan, report = prepared.plan, prepared.report
    with AtomicDirectory(output) as tmp:
        names = shard_names(len(prepared.shards))
        bar = _progress_bar(report.tensor_bytes_after, progress)
        for shard, file in zip(prepared.shards, names):
            write_shard(tmp / file, shard, bar.update)
        bar.close()
        if len(prepared.shards) > 1:
            write_index(tmp, prepared.shards, names)
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        if plan.layers and GROUPINGS[options.grouping].permutes:
            report.kv_head_order = [plan.state.orders[n] for n in sorted(plan.state.orders)]
        report.copied_files = copy_side_files(prepared.src_dir, tmp)
        report.output_bytes = sum(p.stat().st_size for p in tmp.iterdir())
        report.seconds = round(time.perf_counter() - started, 3)
        (tmp / "README.md").write_text(model_card(report, command))
        (tmp / "conversion.json").write_text(report.to_json())


def check_free_space(output: Path, tensor_bytes: int) -> None:
    """Refuse before writing when OUTPUT's filesystem has less free space than the tensors need (plus 1%)."""
    parent = output.absolute()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    needed = int(tensor_bytes * 1.01)
    if free < needed:
        raise ConversionError(
            f"{output}: the converted tensors need {needed:,} bytes but its filesystem has only "
            f"{free:,} free; free space or choose another OUTPUT"
        )


def _progress_bar(total: int, enabled: bool) -> tqdm[Any]:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not enabled or None, leave=False)
