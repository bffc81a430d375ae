"""``kvshrink COMMAND [ARGS ...]``: one console script in front of the project's commands.

Each subcommand hands the rest of the command line to that command's own ``main(argv)``, unchanged, so
``kvshrink convert SOURCE OUTPUT --kv-heads 1`` is ``python -m convert SOURCE OUTPUT --kv-heads 1``. A command
whose ``main`` takes a ``prog`` keyword is told ``kvshrink COMMAND``, so its usage and help name the script.
The command's module is imported only when it runs: ``kvshrink --help`` loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from dataclasses import dataclass

from kvshrink_base.errors import OneLineParser


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its name, the module whose ``main(argv)`` runs it, and its line in ``kvshrink --help``."""

    name: str
    module: str
    summary: str


SUBCOMMANDS = (
    Subcommand("convert", "convert.cli", "stream a checkpoint into one with fewer KV heads (python -m convert)"),
    Subcommand("uptrain", "uptrain.__main__", "uptrain a converted checkpoint from a recipe (python -m uptrain)"),
    Subcommand(
        "evaluate",
        "uptrain.evaluate",
        "held-out perplexity and downstream tasks of checkpoints, side by side (python -m uptrain.evaluate)",
    ),
    Subcommand(
        "sample",
        "uptrain.sample.cli",
        "training text sampled from the original model itself (python -m uptrain.sample)",
    ),
    Subcommand(
        "merge",
        "uptrain.merge",
        "a LoRA run's adapters merged into its base, tensor by tensor (python -m uptrain.merge)",
    ),
    Subcommand(
        "decode-bench",
        "kvshrink.decode_bench.cli",
        "KV-cache bytes and decoding speed, measured (python -m kvshrink.decode_bench)",
    ),
    Subcommand(
        "demo",
        "kvshrink.demo.demo",
        "SmolLM2-135M made MQA, evaluated and uptrained back, offline (python -m kvshrink.demo)",
    ),
)
BY_NAME = {s.name: s for s in SUBCOMMANDS}


def parser() -> OneLineParser:
    """The console script's parser: COMMAND, then the command's own arguments, untouched."""
    width = max(len(s.name) for s in SUBCOMMANDS)
    listing = "\n".join(f"  {s.name:<{width}}  {s.summary}" for s in SUBCOMMANDS)
    p = OneLineParser(
        prog="kvshrink",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert Hugging Face MHA checkpoints to GQA/MQA and uptrain them.",
        epilog=f"commands:\n{listing}\n\n`kvshrink COMMAND --help` shows a command's options.",
    )
    p.add_argument("command", metavar="COMMAND", choices=list(BY_NAME), help="one of the commands below")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's own arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``kvshrink COMMAND ARGS...``; returns the command's exit code (2: no or an unknown command)."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not argv:
        p.print_usage(sys.stderr)
        return 2
    args = p.parse_args(argv)  # an unknown command: one line, exit code 2
    command = BY_NAME[args.command]
    run = importlib.import_module(command.module).main
    if "prog" in inspect.signature(run).parameters:
        return run(args.args, prog=f"kvshrink {command.name}")
    return run(args.args)


if __name__ == "__main__":
    sys.exit(main())
