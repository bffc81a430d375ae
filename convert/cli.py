"""``python -m convert SOURCE OUTPUT --kv-heads N``: the command line around ``convert_checkpoint``."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import threading

from convert.engine import convert_checkpoint
from convert.families import supported
from convert.merge import GROUPINGS, METHODS, calibrated_names, choices_help
from convert.options import (
    CALIBRATION_ORDERS,
    DEFAULT_SEQ_LEN,
    DEFAULT_TOKENS,
    DTYPES,
    RECOMMENDED,
    RECOMMENDED_CPU_LOCAL_STEPS,
    RECOMMENDED_CPU_TOKENS,
    ConvertOptions,
)
from convert.report import format_report
from kvshrink_base.device import pick_device
from kvshrink_base.errors import OneLineParser, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m convert",
        description="Stream a Hugging Face checkpoint into one with fewer KV heads (GQA/MQA). "
        f"Families: {', '.join(supported())}.",
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint directory or hub id")
    parser.add_argument("output", metavar="OUTPUT", help="directory for the converted checkpoint")
    parser.add_argument("--kv-heads", type=int, required=True, metavar="N", help="KV heads wanted (1 = MQA)")
    add_method_arguments(parser)
    add_calibration_arguments(parser)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """How the heads merge: --recommended, --method, --grouping."""
    parser.add_argument(
        "--recommended",
        action="store_true",
        help="the best conversion measured: --method aware --calibration-order sequential --refit-o "
        f"--local-steps {RECOMMENDED['local_steps']} (on a CPU: {RECOMMENDED_CPU_LOCAL_STEPS}, and "
        f"--calibration-tokens {RECOMMENDED_CPU_TOKENS}), "
        "each still overridable; without --calibration-data it calibrates on text sampled from "
        "the source itself",
    )
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help=f"what each merged KV head is, by method. {choices_help(METHODS)}. "
        f"{' and '.join(calibrated_names())} run the source on --calibration-data or, without it, on text sampled "
        "from the source. Default mean (needs no data, fastest); for the best start use --recommended "
        "(docs/convert.md)",
    )
    parser.add_argument(
        "--grouping",
        choices=list(GROUPINGS),
        default="contiguous",
        help=f"which KV heads merge. {choices_help(GROUPINGS)}. Default contiguous",
    )


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """What calibration runs on and how: --calibration-*, --refit-o, --local-steps, --device."""
    parser.add_argument(
        "--calibration-data",
        nargs="+",
        metavar="FILE",
        help="text (.txt, .md or .jsonl with a text field) the source runs on, for svd / aware / "
        "similarity; without it a calibrated method samples text from the source",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"calibration tokens to run (default: {DEFAULT_TOKENS}; {RECOMMENDED_CPU_TOKENS} with "
        "--recommended on a CPU)",
    )
    parser.add_argument(
        "--calibration-seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="N",
        help=f"tokens per calibration forward pass (default: {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument(
        "--calibration-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start every calibration sequence with the tokenizer's BOS (default: off; measured "
        "worse on SmolLM2, see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--calibration-order",
        choices=CALIBRATION_ORDERS,
        default=None,
        help="parallel: one pass of the source model; sequential: layer by layer, each fitted on the "
        "inputs the converted layers below give it (two passes' cost) (default: parallel)",
    )
    parser.add_argument(
        "--refit-o",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --calibration-order sequential: refit each layer's output projection by least "
        "squares to the original attention output on the calibration text",
    )
    parser.add_argument(
        "--local-steps",
        type=int,
        default=None,
        metavar="N",
        help="with --calibration-order sequential: N Adam steps per layer on its Q, K, V and O "
        "against the original attention output on the calibration text (default 0: none)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where calibration runs: auto (CUDA, then MPS, else the CPU), cpu, cuda, cuda:N, mps",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """What is written and how: --dtype, shards, --overwrite, --dry-run, --allow-pickle, --seed."""
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="output dtype (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan (and calibration's peak memory); write nothing",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model.bin weights (loaded with weights_only=True)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for --method random")


def options_of(args: argparse.Namespace) -> ConvertOptions:
    """The flags as ConvertOptions: ``--recommended``'s preset (local steps by device), the flags given on top."""
    given = {name: getattr(args, name) for name in ConvertOptions.fields() if getattr(args, name, None) is not None}
    if args.recommended:
        on_cpu = pick_device(args.device).type == "cpu"
        return ConvertOptions.recommended(**given, on_cpu=on_cpu)
    return ConvertOptions(**given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch takes ~1.5 s to import and is first needed for the first K/V tensor; the plan and the
    # byte copies of unchanged tensors that precede it run meanwhile.
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    command = "python -m convert " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    def body() -> int:
        options = options_of(args)
        report = convert_checkpoint(
            args.source,
            args.output,
            options,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            progress=True,
            command=command,
        )
        print(format_report(report))
        return 0

    return run_cli(body, interrupted="interrupted; nothing was written")
