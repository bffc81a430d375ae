"""``python -m uptrain.evaluate MODEL --data FILE...``: held-out perplexity of any causal LM checkpoint.

The text goes through the same pipeline as training (documents joined with EOS,
cut into --seq-len blocks); the first --max-tokens worth of blocks are scored (``uptrain.perplexity``).
With ``--tasks`` (lm-evaluation-harness), several models or ``--out DIR``, the models are compared side by
side in one table (``uptrain.compare``). Both paths are library calls: ``score`` and ``compare.compare``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from kvshrink_base.device import DEVICE_HELP, pick_device
from kvshrink_base.errors import OneLineParser, run_cli
from kvshrink_base.models import load_config, load_model_and_tokenizer
from kvshrink_base.text import check_entries
from uptrain import compare
from uptrain.checkpoints import check_model
from uptrain.errors import RecipeError
from uptrain.perplexity import check_setting, perplexities, perplexity

__all__ = ["check_setting", "main", "perplexities", "perplexity", "score"]


def score(
    model: str,
    files: list[str],
    seq_len: int = 1024,
    max_tokens: int = 200_000,
    batch_size: int = 4,
    text_field: str = "text",
    device: str = "auto",
) -> dict[str, float]:
    """Perplexity of the checkpoint ``model`` on ``files``, on ``device`` (``kvshrink_base.device.pick_device``'s
    names; auto: the fastest present): every input checked before the weights load.

    Returns:
        {"loss", "ppl", "tokens"} as ``uptrain.perplexity.perplexity``.

    Raises:
        KvshrinkError: a bad device, setting, checkpoint or data file, in one line.
    """
    chosen = pick_device(device)
    check_setting(seq_len, max_tokens, batch_size)
    check_entries(files)
    check_model(model)
    positions = getattr(load_config(model), "max_position_embeddings", None)
    check_setting(seq_len, max_tokens, batch_size, positions)
    loaded, tokenizer = load_model_and_tokenizer(model, device=chosen)
    return perplexity(loaded, tokenizer, files, seq_len, max_tokens, batch_size, text_field)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command's options (a usage error: one line, exit 2)."""
    parser = OneLineParser(
        prog="python -m uptrain.evaluate",
        description="Held-out perplexity of causal LM checkpoints, and downstream tasks through "
        "lm-evaluation-harness, side by side: the text is packed as in training (documents joined with "
        "EOS, cut into --seq-len blocks) and the first --max-tokens worth of blocks scored. The figure "
        "depends on both: compare models at the same setting.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint directories or hub ids (original first)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="text files (.txt/.md/.jsonl/.json/.parquet/.csv)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=1024,
        metavar="N",
        help="tokens per block, at most the model's positions (default 1024)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=200_000,
        metavar="N",
        help="score the first N // seq-len blocks (at least one; default 200000)",
    )
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="blocks per forward pass (default 4)")
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the text column of .jsonl/.json/.parquet/.csv files (default text)",
    )
    # Downstream tasks and the comparison report (uptrain.compare, uptrain.downstream).
    parser.add_argument("--tasks", nargs="+", help="lm-eval task names or task YAML files (needs the eval extra)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: each task's own)")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction when below 1; default: all)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", help="write report.md and report.png into this directory")
    parser.add_argument("--decode", action="store_true", help="add the decode benchmark to the report (with --out)")
    return parser.parse_args(argv)


def comparison(args: argparse.Namespace) -> compare.Comparison:
    """The comparison the command line asks for."""
    return compare.Comparison(
        models=args.models,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        text_field=args.text_field,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        device=args.device,
        out=args.out,
        decode=args.decode,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit code (2: bad input, one line, nothing written)."""
    args = parse_args(argv)
    command = "python -m uptrain.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if args.tasks or args.out or args.decode or len(args.models) > 1:
            compare.compare(comparison(args), command)
            return 0
        if not args.data:
            raise RecipeError("give --data FILE... (perplexity) and/or --tasks TASK... (downstream)")
        model = args.models[0]
        result = score(model, args.data, args.seq_len, args.max_tokens, args.batch_size, args.text_field, args.device)
        print(
            f"{model}: perplexity {result['ppl']:.3f} (loss {result['loss']:.4f}) on {result['tokens']:,} tokens "
            f"({args.seq_len}-token blocks)"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
