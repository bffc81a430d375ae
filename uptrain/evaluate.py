"""``python -m uptrain.evaluate MODEL --data FILE...``: held-out perplexity of any causal LM checkpoint.

The text goes through the same pipeline as training (documents joined with EOS,
cut into --seq-len blocks); the first --max-tokens worth of blocks are scored.
With ``--tasks`` (lm-evaluation-harness), several models or ``--out DIR``, the models are compared side by
side in one table (``uptrain.compare``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from kvshrink.errors import OneLineParser
from uptrain import data
from uptrain.recipe import RecipeError


def check_setting(seq_len: int, max_tokens: int, batch_size: int = 1, positions: int | None = None) -> None:
    """Refuse an eval setting that cannot run: a non-positive size, or blocks beyond the model's positions."""
    for flag, value in (("--seq-len", seq_len), ("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value <= 0:
            raise RecipeError(f"{flag} must be positive, got {value}")
    if positions is not None and seq_len > positions:
        raise RecipeError(f"--seq-len {seq_len} is beyond the model's {positions} positions; use at most {positions}")


def perplexity(model, tokenizer, files: list[str], seq_len: int = 1024, max_tokens: int = 200_000,
               batch_size: int = 4, text_field: str = "text", progress: str | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and token count of `model` on the blocks of `files`.

    `progress`, when given, is the label of a progress bar over the batches.

    Raises:
        RecipeError: a non-positive size, or too little text. Blocks beyond the model's positions are the
            caller's to refuse (``check_setting`` with ``positions``): rotary models still run there.
    """
    from tqdm.auto import tqdm

    check_setting(seq_len, max_tokens, batch_size)
    docs = data.load_documents(files, text_field)
    blocks = data.pack(docs, tokenizer, text_field, seq_len)
    blocks = blocks.select(range(min(len(blocks), max(1, max_tokens // seq_len)))).with_format("torch")
    if len(blocks) == 0:
        raise RecipeError(f"the data gives no block of {seq_len} tokens; add text or lower --seq-len")
    loader = torch.utils.data.DataLoader(blocks, batch_size=batch_size, collate_fn=data.collate)
    batches = tqdm(loader, desc=progress, unit="batch", disable=progress is None, leave=False)
    loss, tokens = loss_sums(model, batches, next(model.parameters()).device)
    return mean_loss(loss.item(), int(tokens.item()))


def perplexities(model_dir: str | Path, texts: dict[str, Path], seq_len: int, max_tokens: int) -> dict[str, float]:
    """{name: perplexity} of the checkpoint at ``model_dir`` (float32, CPU) on each named text file, rounded to
    0.01: the benches' scoring of a model on several texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {name: round(perplexity(model, tokenizer, [str(f)], seq_len, max_tokens)["ppl"], 2)
            for name, f in texts.items()}


def loss_sums(model, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ next-token loss, tokens scored) over batches of (B, T) ``input_ids``, float64 on ``device``.

    The one eval loop: ``perplexity`` here and the uptrainer's in-loop eval (which sums it across processes).
    """
    from uptrain.train import token_losses

    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"].to(device)
            loss += token_losses(model(input_ids=ids).logits, ids).double()
            tokens += ids[:, 1:].numel()
    model.train(was_training)
    return loss, tokens


def mean_loss(loss: float, tokens: int) -> dict[str, float]:
    """{"loss": mean next-token loss, "ppl": its exp, "tokens": tokens scored}."""
    return {"loss": loss / tokens, "ppl": math.exp(min(loss / tokens, 700)), "tokens": tokens}


def parse_args(argv: list[str] | None):
    parser = OneLineParser(
        prog="python -m uptrain.evaluate",
        description="Held-out perplexity of causal LM checkpoints, and downstream tasks through "
                    "lm-evaluation-harness, side by side: the text is packed as in training (documents joined with "
                    "EOS, cut into --seq-len blocks) and the first --max-tokens worth of blocks scored. The figure "
                    "depends on both: compare models at the same setting.")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint directories or hub ids (original first)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="text files (.txt/.md/.jsonl/.json/.parquet/.csv)")
    parser.add_argument("--seq-len", type=int, default=1024, metavar="N",
                        help="tokens per block, at most the model's positions (default 1024)")
    parser.add_argument("--max-tokens", type=int, default=200_000, metavar="N",
                        help="score the first N // seq-len blocks (at least one; default 200000)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="blocks per forward pass (default 4)")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="the text column of .jsonl/.json/.parquet/.csv files (default text)")
    # Downstream tasks and the comparison report (uptrain.compare, uptrain.downstream).
    parser.add_argument("--tasks", nargs="+", help="lm-eval task names or task YAML files (needs the eval extra)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: each task's own)")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction when below 1; default: all)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--out", help="write report.md and report.png into this directory")
    parser.add_argument("--decode", action="store_true", help="add the decode benchmark to the report (with --out)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tasks or args.out or args.decode or len(args.models) > 1:
        import shlex

        from uptrain import compare

        command = "python -m uptrain.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
        return compare.main(args, command)
    args.model = args.models[0]
    if not args.data:
        print("error: give --data FILE... (perplexity) and/or --tasks TASK... (downstream)", file=sys.stderr)
        return 2
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from uptrain.checkpoints import check_model, tokenizer_error

    try:
        check_setting(args.seq_len, args.max_tokens, args.batch_size)
        check_model(args.model)
        try:
            config = AutoConfig.from_pretrained(args.model)
            check_setting(args.seq_len, args.max_tokens, args.batch_size,
                          getattr(config, "max_position_embeddings", None))  # before the weights load
        except (OSError, ValueError) as exc:
            raise RecipeError(f"cannot load {args.model}: {str(exc).splitlines()[0]}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            raise tokenizer_error(args.model, exc) from None
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        except (OSError, ValueError) as exc:
            raise RecipeError(f"cannot load {args.model}: {str(exc).splitlines()[0]}") from None
        if torch.cuda.is_available():
            model.cuda()
        result = perplexity(model, tokenizer, args.data, args.seq_len, args.max_tokens, args.batch_size,
                            args.text_field)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"{args.model}: perplexity {result['ppl']:.3f} (loss {result['loss']:.4f}) on {result['tokens']:,} tokens "
          f"({args.seq_len}-token blocks)")
    return 0

if __name__ == "__main__":
    sys.exit(main())
