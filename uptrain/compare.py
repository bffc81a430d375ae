"""Models side by side: downstream tasks, perplexity, KV cache and size in one table (``python -m uptrain.evaluate``).

``python -m uptrain.evaluate ORIGINAL CONVERTED... --tasks TASK... [--data FILE...] [--out DIR] [--decode]``
runs the same tasks with the same settings on every model, one model in memory at a time, and prints one
Markdown table: a row per model; its conversion method (from ``conversion.json``), KV heads, KV-cache bytes
per token and per 4k context (``convert.report``'s arithmetic), parameters, each task's main metric with its
standard error (``uptrain.downstream``), and perplexity on ``--data`` (``uptrain.perplexity.perplexity``).
``--out DIR`` writes the table as ``report.md`` and a bar chart per metric, original first, as ``report.png``;
``--decode`` adds the decode benchmark (``kvshrink.decode_bench``) of the same checkpoints to the report.

``compare(Comparison(...), command)`` is the library call; the command line only fills a ``Comparison``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from convert.errors import ConversionError
from convert.report import config_kv_cache
from kvshrink_base.device import pick_device
from kvshrink_base.models import load_model_and_tokenizer
from kvshrink_base.text import check_entries
from uptrain import downstream
from uptrain.decoding import DecodeError, bench
from uptrain.downstream import Score, Tasks
from uptrain.errors import RecipeError
from uptrain.perplexity import perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONTEXT = 4096  # the "per 4k context" column, batch 1


@dataclass
class Row:
    """One model of the comparison."""

    model: str  # as given on the command line
    method: str | None = None  # conversion.json's method, when the checkpoint has one
    kv_heads: int | None = None  # None: a family the converter does not know
    kv_bytes_per_token: int | None = None
    parameters: int = 0
    scores: dict[str, Score] = field(default_factory=dict)
    ppl: float | None = None


@dataclass
class Comparison:
    """What to compare and how: the models (original first), perplexity on ``data``, downstream ``tasks``, and
    where the report goes (``out``; ``decode`` adds the decode benchmark). The options of
    ``python -m uptrain.evaluate``."""

    models: list[str]
    data: list[str] | None = None
    seq_len: int = 1024
    max_tokens: int = 200_000
    batch_size: int = 4
    text_field: str = "text"
    tasks: list[str] | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    device: str = "auto"  # a name for kvshrink_base.device.pick_device; auto: the fastest present
    out: str | None = None
    decode: bool = False


def check(c: Comparison) -> tuple[Tasks | None, argparse.Namespace | None]:
    """Refuse bad input in one line before any model loads; returns the checked tasks (None without tasks) and
    the decode benchmark's checked options (None without ``decode``)."""
    pick_device(c.device)  # a bad --device first: it is refused whatever else is asked
    if not c.tasks and not c.data:
        raise RecipeError("nothing to measure: give --tasks TASK... (downstream) and/or --data FILE... (perplexity)")
    positive = {
        "--batch-size": c.batch_size,
        "--seq-len": c.seq_len,
        "--max-tokens": c.max_tokens,
        "--limit": c.limit if c.limit is not None else 1,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise RecipeError(f"{flag} must be positive, got {value}")
    if c.num_fewshot is not None and c.num_fewshot < 0:
        raise RecipeError(f"--num-fewshot must be 0 or more, got {c.num_fewshot}")
    for model in c.models:
        if not Path(model).is_dir() and (os.sep in model or model.startswith(".") or model.count("/") != 1):
            raise RecipeError(f"model {model} is not a checkpoint directory (nor a hub id like org/name)")
    if c.decode and len(c.models) < 2:
        raise RecipeError("--decode compares models: give ORIGINAL and at least one CONVERTED checkpoint")
    if c.decode and not c.out:
        raise RecipeError("--decode writes its results into the report: give --out DIR")
    if c.out and Path(c.out).exists() and not Path(c.out).is_dir():
        raise RecipeError(f"--out {c.out} is a file; give a directory")
    check_entries(c.data or [])
    bench = decode_options(c) if c.decode else None  # its own checks: same vocabulary, width and tokenizer
    tasks = (
        downstream.load_tasks(c.tasks, c.num_fewshot, downstream.task_limit(c.limit), c.batch_size) if c.tasks else None
    )
    return tasks, bench


def describe(model_arg: str, model: PreTrainedModel) -> Row:
    """Method, KV heads, KV-cache bytes per token and parameters of a loaded model."""
    row = Row(model_arg, parameters=sum(p.numel() for p in model.parameters()))
    conversion = Path(model_arg) / "conversion.json"
    if conversion.is_file():
        row.method = json.loads(conversion.read_text()).get("method")
    itemsize = next(model.parameters()).element_size()
    try:
        row.kv_heads, row.kv_bytes_per_token = config_kv_cache(model.config.to_dict(), itemsize)
    except ConversionError:
        pass  # a family the converter does not know: the columns say "?"
    return row


def measure(c: Comparison, tasks: Tasks | None) -> list[Row]:
    """Every model in turn: load, describe, perplexity on the data, the tasks."""
    rows, device = [], pick_device(c.device)
    for i, model_arg in enumerate(c.models):
        print(f"[{i + 1}/{len(c.models)}] {model_arg}", file=sys.stderr, flush=True)
        model, tokenizer = load_model_and_tokenizer(model_arg, device=device)
        row = describe(model_arg, model)
        if c.data:
            row.ppl = perplexity(
                model,
                tokenizer,
                c.data,
                c.seq_len,
                c.max_tokens,
                c.batch_size,
                c.text_field,
                progress=f"perplexity {Path(model_arg).name}",
            )["ppl"]
        if tasks is not None:
            row.scores = downstream.evaluate(model, tokenizer, tasks)
        rows.append(row)
        del model
        gc.collect()
    return rows


def metric_columns(rows: list[Row]) -> list[str]:
    """The table's metric columns, in task order: "TASK METRIC", then "perplexity"."""
    names = list(dict.fromkeys(f"{task} {s.metric}" for r in rows for task, s in r.scores.items()))
    return names + (["perplexity"] if any(r.ppl is not None for r in rows) else [])


def format_table(rows: list[Row]) -> str:
    """The comparison as a Markdown table: a row per model, the original (first) at the top."""
    columns = metric_columns(rows)
    head = [
        "model",
        "method",
        "KV heads",
        "KV cache/token",
        f"KV cache, {CONTEXT // 1024}k context",
        "parameters",
        *[c if c == "perplexity" else f"{c} ± stderr" for c in columns],
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        per_token = r.kv_bytes_per_token  # None: a family the converter does not know
        cells = [
            r.model,
            r.method or "—",
            "?" if per_token is None else str(r.kv_heads),
            "?" if per_token is None else f"{per_token:,} B",
            "?" if per_token is None else f"{per_token * CONTEXT / 2**20:,.1f} MiB",
            f"{r.parameters:,}",
        ]
        for column in columns:
            cells.append(value_text(r, column))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_value(row: Row, column: str) -> tuple[float | None, float | None]:
    """(value, stderr) of a table column for one model; (None, None) where it was not measured."""
    if column == "perplexity":
        return row.ppl, None
    task, metric = column.rsplit(" ", 1)
    score = row.scores.get(task)
    return (score.value, score.stderr) if score and score.metric == metric else (None, None)


def value_text(row: Row, column: str) -> str:
    """A table cell: the value (± its stderr), or a dash where it was not measured."""
    value, stderr = metric_value(row, column)
    if value is None:
        return "—"
    if column == "perplexity":
        return f"{value:,.2f}"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def plot(rows: list[Row], path: Path) -> None:
    """A bar chart per metric column, one bar per model in table order (original first), stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = metric_columns(rows)
    width = max(3.5, 0.7 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, len(columns), figsize=(width * len(columns), 4.5), squeeze=False)
    labels = [Path(r.model).name or r.model for r in rows]
    for ax, column in zip(axes[0], columns):
        values = [metric_value(r, column) for r in rows]
        heights = [v if v is not None else 0.0 for v, _ in values]
        errors = [e if e is not None else 0.0 for _, e in values]
        ax.bar(range(len(rows)), heights, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(column, fontsize=9)
        if column == "perplexity":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: list[Row], tasks: Tasks | None, command: str, decode: list[str]) -> None:
    """OUT/report.md and OUT/report.png, each written to a temporary name and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    text = ["# Model comparison", "", f"`{command}`", "", format_table(rows), ""]
    if tasks is not None:
        shots = "each task's default" if tasks.num_fewshot is None else str(tasks.num_fewshot)
        text.append(
            f"Downstream tasks through lm-evaluation-harness: few-shot {shots}, "
            f"{'all documents' if tasks.limit is None else f'limit {tasks.limit}'} per task; "
            "the main metric is the first of the task's metric_list."
        )
    text += [
        f"KV cache: bytes per token of every layer's K and V in the model's dtype, and for one sequence of "
        f"{CONTEXT:,} tokens.",
        "",
        "![metrics, original first](report.png)",
        "",
    ]
    if decode:
        text += ["## Decoding (decode_bench)", "", *decode, ""]
    for name, write in (
        ("report.png", lambda p: plot(rows, p)),
        ("report.md", lambda p: p.write_text("\n".join(text))),
    ):
        tmp = out / f".{name}.tmp{Path(name).suffix}"
        write(tmp)
        os.replace(tmp, out / name)


def decode_options(c: Comparison) -> argparse.Namespace:
    """The decode benchmark's options for the same checkpoints on the same device (its defaults there), checked."""
    assert c.out is not None, "check() refuses --decode without --out"
    try:
        return bench.checkpoint_options(c.models, Path(c.out) / "decode", c.device)
    except DecodeError as exc:
        raise RecipeError(f"--decode: {exc}") from None


def decode_report(options: argparse.Namespace) -> list[str]:
    """Run the decode benchmark on the same checkpoints into OUT/decode; returns its report lines."""
    try:
        return bench.run(options)
    except DecodeError as exc:
        raise RecipeError(f"--decode: {exc}") from None


def compare(c: Comparison, command: str) -> list[Row]:
    """Measure every model, print the table and, with ``out``, write the report; returns the rows.

    Args:
        c: what to compare.
        command: the command line the report names.

    Raises:
        KvshrinkError, OSError: bad input (before any model loads) or an unwritable report, in one line.
    """
    tasks, bench = check(c)
    rows = measure(c, tasks)
    decode = decode_report(bench) if bench is not None else []
    if c.out:
        write_report(Path(c.out), rows, tasks, command, decode)
    print(format_table(rows))
    if c.out:
        print(f"\nwritten: {Path(c.out) / 'report.md'}, {Path(c.out) / 'report.png'}")
    return rows
