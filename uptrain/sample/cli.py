"""``python -m uptrain.sample MODEL OUT.jsonl --tokens N``: the command of ``kvshrink_base.sample``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvshrink_base.device import DEVICE_HELP, pick_device
from kvshrink_base.errors import OneLineParser, positive_int, run_cli
from kvshrink_base.sample import Sampling, write_samples
from uptrain.checkpoints import check_model
from uptrain.errors import RecipeError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's options (a usage error: one line, exit 2)."""
    p = OneLineParser(
        prog="python -m uptrain.sample",
        description="Write training text sampled from a model (its own distribution: uptraining "
        "on it keeps the converted model close to the original everywhere, with no "
        'dataset). One JSON object per line, {"text": ...}.',
    )
    p.add_argument("model", help="the original checkpoint (directory or hub id)")
    p.add_argument("out", help="the .jsonl file to write (it appears when complete)")
    p.add_argument("--tokens", type=positive_int, required=True, help="tokens to write, at least")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples drawn at once (default 64)")
    p.add_argument("--length", type=positive_int, default=320, help="new tokens per sample, at most (default 320)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (when the new one is done)")
    return p.parse_args(argv)


def check_out(out: Path, overwrite: bool) -> None:
    """A .jsonl path whose directory exists and can be written, not an existing file unless ``overwrite``,
    before the model loads."""
    if out.suffix != ".jsonl":
        raise RecipeError(f"{out}: give a .jsonl file name (one JSON document per line)")
    if out.is_dir():
        raise RecipeError(f"{out} is a directory; give a .jsonl file name")
    if out.exists() and not overwrite:
        raise RecipeError(f"{out} exists; give --overwrite to replace it")
    if not out.parent.is_dir():
        raise RecipeError(f"{out}: the directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise RecipeError(f"{out}: the directory {out.parent} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit code (2: bad input, one line, nothing written)."""
    args = parse_args(argv)

    def body() -> int:
        device = pick_device(args.device)  # a bad --device is refused before anything else is read
        out = Path(args.out).expanduser()
        if not args.temperature > 0:
            raise RecipeError(f"--temperature must be above 0, got {args.temperature}")
        check_out(out, args.overwrite)
        check_model(args.model)
        how = Sampling(args.tokens, args.batch_size, args.length, args.temperature, args.seed)
        done = write_samples(args.model, out, how, str(device))
        print(f"{out}: {done['documents']:,} documents, {done['tokens']:,} tokens, {done['seconds']} s")
        return 0

    return run_cli(body, "interrupted; nothing was written")
