"""``python -m kvshrink.decode_bench ORIGINAL CONVERTED [...]``: KV-cache bytes and decoding speed, measured.

What a conversion buys at inference, in stock transformers (``DynamicCache``, ``attn_implementation="sdpa"``),
on the user's own checkpoints::

    MHA  q0 q1 q2 q3 q4 q5    GQA  q0 q1 q2 q3 q4 q5    MQA  q0 q1 q2 q3 q4 q5
         |  |  |  |  |  |          \\___/ \\___/ \\___/         \\_______________/
         k0 k1 k2 k3 k4 k5           k0    k1    k2                  k0
    cache per layer and token:  6 heads            3 heads                   1 head

For each model and each (batch, context) cell of the grid (``uptrain.decoding.measure`` does the measuring):

- prefill: random token ids of length ``context`` into a fresh DynamicCache, not timed. At most
  ``--prefill-tokens`` go through at once: a divisor of the batch is prefilled and the cache repeated to the
  full batch (same shapes and bytes), so big cells are bound by the cache, not by prefill activations;
- cache: the bytes of every layer's key and value tensors in the cache object, read after prefill, and
  their ratio to the first model's;
- decode: ``--new-tokens`` greedy steps, one token per forward through ``past_key_values``, after
  ``--warmup`` untimed steps, ``--repeats`` times (cropped back to ``context`` in between); tokens/s =
  batch * new_tokens / seconds, median and min..max over the repeats.

``--device`` is chosen by ``kvshrink_base.device.pick_device`` (auto: CUDA, then MPS, else the CPU); the grid's
defaults are the device type's (``DEFAULTS``). Then: the largest batch within ``--memory-budget`` at
``--fit-context`` (CUDA: measured by doubling and bisection under that cap; CPU and MPS: computed from the
measured cache bytes), the attention kernel a decode step really runs and whether K/V reach it expanded, and
greedy generations from the same prompts side by side.
Written to ``--out``: results.csv, fit.csv, decode.png (tokens/s against context), report.txt.

    python -m kvshrink.decode_bench ORIGINAL CONVERTED --mha-twin          # CPU: small grid
    python -m kvshrink.decode_bench --synthetic llama-1b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.source import check_checkpoint
from kvshrink_base.device import DEVICE_HELP, pick_device
from kvshrink_base.errors import KvshrinkError, OneLineParser, check_output_dir, first_line
from uptrain.decoding import DecodeError

if TYPE_CHECKING:
    from uptrain.decoding.measure import Cell, Model

DEFAULTS = {  # per device type: a CPU run takes minutes; the CUDA grid reaches 128 x 8k contexts
    "cpu": dict(batch=[1, 4], context=[256, 1024], new_tokens=16, prefill_tokens=1024),
    "cuda": dict(batch=[1, 8, 32, 128], context=[512, 2048, 8192], new_tokens=32, prefill_tokens=32768),
}
SMALL_GRID = "cpu"  # the defaults of a device type without its own entry (mps: memory shared with the CPU)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Shall I compare thee to a summer's day?"]
# LlamaConfig's keyword arguments (of several types) for each synthetic shape
LLAMA_1B: dict[str, Any] = dict(
    hidden_size=2048,
    num_attention_heads=16,
    num_hidden_layers=16,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=16384,
    tie_word_embeddings=False,
)
LLAMA_TINY: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
)
SYNTHETIC = {  # name -> (LlamaConfig kwargs, {variant: KV heads}); random weights: speed and memory only
    "llama-1b": (LLAMA_1B, {"mha": 16, "gqa8": 8, "mqa": 1}),
    "llama-tiny": (LLAMA_TINY, {"mha": 4, "gqa2": 2, "mqa": 1}),
}
CACHE_NAMES = {
    "off": "DynamicCache",
    "eager": "StaticCache",
    "compile": "StaticCache + torch.compile(mode=reduce-overhead)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_args(argv: list[str] | None, prog: str = "python -m kvshrink.decode_bench") -> argparse.Namespace:
    """The command's options (a usage error: one line, exit 2)."""
    return parser(prog).parse_args(argv)


def parser(prog: str = "python -m kvshrink.decode_bench") -> OneLineParser:
    """The command's options; their defaults are also ``checkpoint_options``'."""
    p = OneLineParser(prog=prog, description="KV-cache bytes and decode speed of a model and its conversions.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="ORIGINAL then CONVERTED... checkpoint directories")
    p.add_argument("--synthetic", choices=list(SYNTHETIC), help="random Llama variants instead of checkpoints")
    p.add_argument(
        "--mha-twin",
        action="store_true",
        help="also measure ORIGINAL's MHA twin (KV heads repeated: same function), listed first",
    )
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (cpu, mps: 1 4; cuda: 1 8 32 128)")
    p.add_argument("--context", type=int, nargs="+", help="context lengths (cpu, mps: 256 1024; cuda: 512 2048 8192)")
    p.add_argument("--new-tokens", type=int, help="timed decode steps per repeat (cpu, mps: 16; cuda: 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per cell (default: 5)")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (default: 4)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: the checkpoint's dtype (synthetic: bfloat16 on cuda, else float32)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=Path, default=Path("bench/out/decode"), help="results directory")
    p.add_argument("--memory-budget", type=float, metavar="GB", help="default: the device's total memory")
    p.add_argument("--fit-context", type=int, default=2048, help="context of the largest-batch search")
    p.add_argument("--prefill-tokens", type=int, help="most tokens prefilled at once (cpu, mps: 1024; cuda: 32768)")
    p.add_argument(
        "--static-cache",
        choices=["off", "eager", "compile"],
        default="off",
        help="decode through a StaticCache (compile: its forward under torch.compile, CUDA graphs "
        "on CUDA); the eager DynamicCache path is launch-bound at small batches (default: off)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--prompts", nargs="+", default=PROMPTS, help="prompts for the greedy outputs compared")
    p.add_argument("--gen-tokens", type=int, default=24, help="tokens generated per prompt (default: 24)")
    return p


def checkpoint_options(models: list[str], out: Path, device: str = "auto") -> argparse.Namespace:
    """The bench as a library call (``python -m uptrain.evaluate --decode``): ``models`` (original first) at every
    option's default (the device's grid), writing into ``out``; checked as the command checks its own, and the
    checkpoints checked for one vocabulary, width and tokenizer. Run it with ``run``.

    Raises:
        DecodeError: a bad checkpoint or output directory.
        DeviceError: ``device`` is not a device, or is absent here.
    """
    defaults = {a.dest: a.default for a in parser()._actions if a.dest != "help"}
    options = argparse.Namespace(**{**defaults, "models": list(models), "out": Path(out), "device": device})
    options.command = "python -m kvshrink.decode_bench " + shlex.join(options.models)
    check_args(options)
    check_checkpoints(options.models)
    return options


def check_args(args: argparse.Namespace) -> None:
    """Choose the device, fill its defaults and refuse impossible requests before any model is loaded.

    Raises:
        DecodeError: bad checkpoints, numbers or output directory.
        DeviceError: ``--device`` is not a device, or is absent here.
    """
    device = pick_device(args.device)  # first: a bad --device is refused whatever else is wrong
    if args.synthetic and args.models:
        raise DecodeError("--synthetic builds its own models; give no checkpoint directories with it")
    if not args.synthetic and len(args.models) + args.mha_twin < 2:
        raise DecodeError("give ORIGINAL and at least one CONVERTED directory (or --mha-twin, or --synthetic)")
    try:  # the converter's checks: a directory with a readable config.json and sound weights
        for path in args.models:
            check_checkpoint(path, hub=False, allow_pickle=True)
        check_output_dir(args.out, "--out")
    except KvshrinkError as exc:  # ConversionError and the base's own: the bench's error, same line
        raise DecodeError(str(exc)) from None
    args.device = str(device)  # "cpu", "cuda", "cuda:1", "mps": what the measuring code is given
    for key, value in DEFAULTS.get(device.type, DEFAULTS[SMALL_GRID]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    numbers = {
        "--batch": args.batch,
        "--context": args.context,
        "--new-tokens": [args.new_tokens],
        "--repeats": [args.repeats],
        "--fit-context": [args.fit_context],
        "--prefill-tokens": [args.prefill_tokens],
        "--gen-tokens": [args.gen_tokens],
    }
    for flag, values in numbers.items():
        if any(v < 1 for v in values):
            raise DecodeError(f"{flag} must be positive, got {' '.join(map(str, values))}")
    if args.threads is not None and args.threads < 1:
        raise DecodeError(f"--threads must be positive, got {args.threads}")
    if args.warmup < 0:
        raise DecodeError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise DecodeError(f"--memory-budget must be positive (GB), got {args.memory_budget}")


def check_checkpoints(paths: list[str]) -> None:
    """All checkpoints of one model (vocabulary, width, depth) with one tokenizer."""
    from transformers import AutoConfig

    configs = []
    for path in paths:
        try:
            configs.append(AutoConfig.from_pretrained(path))
        except (ValueError, OSError, KeyError) as exc:
            raise DecodeError(f"{path}: unreadable config.json ({first_line(exc)})") from None
    for path, config in zip(paths[1:], configs[1:]):
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            mine, theirs = getattr(config, key, None), getattr(configs[0], key, None)
            if mine != theirs:
                raise DecodeError(
                    f"{path} has {key} {mine}, {paths[0]} has {theirs}: compare a model with its own conversions"
                )
    vocabs = [(path, vocab) for path in paths if (vocab := tokenizer_vocab(Path(path))) is not None]
    for path, vocab in vocabs[1:]:
        if vocab != vocabs[0][1]:
            raise DecodeError(
                f"{path} has another tokenizer than {vocabs[0][0]}: compare a model with its own conversions"
            )


def tokenizer_vocab(path: Path) -> dict[str, int] | None:
    """The token -> id map of the tokenizer saved in `path`, or None when it has none."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (ValueError, OSError) as exc:
        raise DecodeError(f"{path}: unreadable tokenizer ({first_line(exc)})") from None


def load_checkpoint(path: Path, dtype: str) -> Model:
    """A checkpoint in stock transformers with SDPA attention, on the CPU (moved to the device per use)."""
    from kvshrink_base.models import load_model
    from uptrain.decoding.measure import describe

    return describe(path.name, load_model(path, dtype, attn_implementation="sdpa"), path)


def synthetic_models(name: str, dtype: str, device: str) -> list[Model]:
    """Randomly initialised Llama variants of one shape, one per KV-head count (MHA first)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from uptrain.decoding.measure import describe, is_cuda

    shape, variants = SYNTHETIC[name]
    if dtype == "auto":
        dtype = "bfloat16" if is_cuda(device) else "float32"
    models = []
    for variant, kv_heads in variants.items():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, num_key_value_heads=kv_heads)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        models.append(describe(f"{name}-{variant}", model, None))
    return models


def load_models(args: argparse.Namespace) -> list[Model]:
    """The models in table order: [MHA twin], ORIGINAL, CONVERTED... (or the synthetic variants)."""
    from uptrain.decoding.measure import describe
    from uptrain.decoding.mha_twin import mha_twin

    if args.synthetic:
        return synthetic_models(args.synthetic, args.dtype, args.device)
    check_checkpoints(args.models)
    models = [load_checkpoint(Path(p), args.dtype) for p in args.models]
    if len({m.name for m in models}) < len(models):  # same folder name under different parents
        for m in models:
            m.name = str(m.path)
    if args.mha_twin:
        first = models[0]
        models.insert(0, describe(f"{first.name} (MHA twin)", mha_twin(first.model), first.path))
    return models


def generations(models: list[Model], args: argparse.Namespace) -> list[str]:
    """Greedy continuations of the same prompts by every model, side by side, as report lines."""
    from transformers import AutoTokenizer

    from kvshrink_base.generate import greedy, side_by_side
    from uptrain.decoding.measure import on_device

    if any(m.path is None or tokenizer_vocab(m.path) is None for m in models):
        return ["outputs compared: skipped, a model has no tokenizer in its directory"]
    outputs = {}
    for m in models:
        with on_device(m, args.device) as model:
            outputs[m.name] = greedy(model, AutoTokenizer.from_pretrained(m.path), args.prompts, args.gen_tokens)
    return [f"outputs compared (greedy, {args.gen_tokens} new tokens):", *side_by_side(args.prompts, outputs)]


def table(cells: list[Cell], device: str) -> list[str]:
    """The measured grid as a Markdown table (cache ratio and throughput against the first model)."""
    from uptrain.decoding.measure import is_cuda

    cuda = is_cuda(device)
    head = [
        "model",
        "KV heads",
        "batch",
        "context",
        "KV cache",
        "cache vs first",
        "ms/step",
        "tokens/s (median)",
        "min..max",
        "speed vs first",
    ] + (["peak memory"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [c.model, str(c.kv_heads), str(c.batch), str(c.context)]
        if c.status != "ok":
            row += [c.status] + [""] * (len(head) - 5)
        else:
            row += [
                f"{c.cache_bytes / 1e6:,.1f} MB",
                f"{c.cache_ratio:.3f}" if c.cache_ratio else "n/a",
                f"{c.ms_per_step:,.1f}",
                f"{c.tokens_per_s:,.1f}",
                f"{c.tokens_per_s_min:,.1f}..{c.tokens_per_s_max:,.1f}",
                f"{c.speedup:.2f}x" if c.speedup else "n/a",
            ]
            row += [f"{c.peak_bytes / 1e9:.2f} GB"] if cuda else []
        lines.append("| " + " | ".join(row) + " |")
    return lines


def fit_table(rows: list[dict[str, str | int | float]]) -> list[str]:
    """The largest batches (``largest_batches``' rows) as a Markdown table."""
    lines = ["| model | KV heads | context | budget | weights | largest batch | how |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['kv_heads']} | {r['context']} | {r['budget_gb']} GB | {r['weights_gb']} GB | "
        f"{r['largest_batch']:,} | {r['how']} |"
        for r in rows
    ]
    return lines


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """``rows`` as a CSV file with a header line, the columns in the first row's order."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """tokens/s against context, one line per (model, batch): colour by model, line style by batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c.model for c in cells))
    batches, contexts = sorted({c.batch for c in cells}), sorted({c.context for c in cells})
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        for j, batch in enumerate(batches):
            points = [
                (c.context, c.tokens_per_s) for c in cells if c.model == name and c.batch == batch and c.status == "ok"
            ]
            if points:
                ax.plot(
                    *zip(*points),
                    marker="o",
                    color=f"C{i}",
                    linestyle=["-", "--", ":", "-."][j % 4],
                    label=f"{name}, batch {batch}",
                )
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (median)", title=title)
    ax.set_xticks(contexts, labels=[str(x) for x in contexts])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[str]:
    """Load, measure, compare; returns the report lines and writes every result file."""
    import torch
    import transformers

    from uptrain.decoding.measure import attention_path, largest_batches, measure_cell

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(args)
    args.out.mkdir(parents=True, exist_ok=True)  # before measuring: a bad --out shows in seconds, not minutes
    dtype = str(next(models[0].model.parameters()).dtype).removeprefix("torch.")
    report = [
        args.command,
        f"device {args.device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {dtype}, {CACHE_NAMES[args.static_cache]}, attn_implementation=sdpa",
        "attention in one decode step (no padding mask, as in every cell):",
    ]
    for m in models:
        m.attention = attention_path(m, args.device)
        report.append(f"  {m.name}: {m.attention}")
    cells, load_before = [], os.getloadavg()[0]  # other work on the same cores shows in the spread
    for batch in args.batch:
        for context in args.context:
            print(f"measuring batch {batch} x context {context} ...", file=sys.stderr, flush=True)
            measured = measure_cell(models, batch, context, args)
            for c in measured:
                speed = f"{c.tokens_per_s:,.1f} tokens/s (median of {len(c.times)})" if c.status == "ok" else c.status
                print(f"  {c.model}: batch {c.batch}, context {c.context}: {speed}", file=sys.stderr, flush=True)
            cells += measured
    report[1] += f"; load average {load_before:.1f} before the grid, {os.getloadavg()[0]:.1f} after"
    fit = largest_batches(models, cells, args) if args.static_cache == "off" else []  # memory: the DynamicCache run
    report += [
        "",
        *table(cells, args.device),
        "",
        f"largest batch at context {args.fit_context}:",
        *fit_table(fit),
        "",
        *generations(models, args),
    ]
    write_csv(
        args.out / "results.csv",
        [
            {
                **asdict(c),
                "times": " ".join(f"{t:.6f}" for t in c.times),
                "device": args.device,
                "dtype": dtype,
                "new_tokens": args.new_tokens,
            }
            for c in cells
        ],
    )
    if fit:
        write_csv(args.out / "fit.csv", fit)
    plot(cells, args.out / "decode.png", f"decode speed, {args.device}, {dtype}")
    (args.out / "report.txt").write_text("\n".join(report) + "\n")
    (args.out / "attention.json").write_text(json.dumps({m.name: m.attention for m in models}, indent=2) + "\n")
    return report
