"""``python -m uptrain.evaluate MODEL --data FILE...``: held-out perplexity of any causal LM checkpoint.

The text goes through the same pipeline as training (documents joined with EOS,
cut into --seq-len blocks); the first --max-tokens worth of blocks are scored.
With ``--tasks`` (lm-evaluation-harness), several models or ``--out DIR``, the models are compared side by
side in one table (``uptrain.compare``).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from uptrain import data
from uptrain.recipe import RecipeError


def perplexity(model, tokenizer, files: list[str], seq_len: int = 1024, max_tokens: int = 200_000,
               batch_size: int = 4, text_field: str = "text", progress: str | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and token count of `model` on the blocks of `files`.

    `progress`, when given, is the label of a progress bar over the batches.
    """
    from tqdm.auto import tqdm

    from uptrain.train import token_losses

    docs = data.load_documents(files, text_field)
    blocks = data.pack(docs, tokenizer, text_field, seq_len)
    blocks = blocks.select(range(min(len(blocks), max(1, max_tokens // seq_len)))).with_format("torch")
    if len(blocks) == 0:
        raise RecipeError(f"the data gives no block of {seq_len} tokens; add text or lower --seq-len")
    device = next(model.parameters()).device
    loss, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        loader = torch.utils.data.DataLoader(blocks, batch_size=batch_size, collate_fn=data.collate)
        for batch in tqdm(loader, desc=progress, unit="batch", disable=progress is None, leave=False):
            ids = batch["input_ids"].to(device)
            loss += token_losses(model(input_ids=ids).logits, ids).item()
            tokens += ids[:, 1:].numel()
    return {"loss": loss / tokens, "ppl": math.exp(min(loss / tokens, 700)), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uptrain.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint directories or hub ids (original first)")
    parser.add_argument("--data", nargs="+", help="text files (.txt/.jsonl/.json/.parquet/.csv)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-field", default="text")
    # Downstream tasks and the comparison report (uptrain.compare, uptrain.downstream).
    parser.add_argument("--tasks", nargs="+", help="lm-eval task names or task YAML files (needs the eval extra)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: each task's own)")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction when below 1; default: all)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--out", help="write report.md and report.png into this directory")
    parser.add_argument("--decode", action="store_true", help="add the decode benchmark to the report (with --out)")
    args = parser.parse_args(argv)
    if args.tasks or args.out or args.decode or len(args.models) > 1:
        import shlex

        from uptrain import compare

        command = "python -m uptrain.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
        return compare.main(args, command)
    args.model = args.models[0]
    if not args.data:
        print("error: give --data FILE... (perplexity) and/or --tasks TASK... (downstream)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    except (OSError, ValueError) as exc:
        print(f"error: cannot load {args.model}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        model.cuda()
    try:
        result = perplexity(model, tokenizer, args.data, args.seq_len, args.max_tokens, args.batch_size,
                            args.text_field)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model}: perplexity {result['ppl']:.3f} (loss {result['loss']:.4f}) on {result['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
