"""Peak memory and speed of one distillation training step: full logits vs the chunked loss (uptrain.loss).

    python bench/loss_memory.py                       # vocab 128,256, hidden 64, 2 layers, 4 x 2048 tokens
    python bench/loss_memory.py --batch 1             # a quarter of it (the full path needs ~25 GB at batch 4)

A model with a real 128k vocabulary and a tiny body, so the loss dominates: student (1 KV head) and teacher
(4 KV heads), both float32 on the CPU. Each path runs in its own process: build both models, one warm-up step
(forward, teacher forward, backward), then ``--steps`` timed steps. Peak memory is the process's peak resident
set (``ru_maxrss``) after the steps minus its peak after building the models (which is also the baseline of
weights, gradients and the allocator), so it is what a step adds. The two paths are run alternately,
``--repeats`` times; medians are printed with the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(path: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from uptrain.loss import chunked_loss, distill_kl, token_losses

    torch.manual_seed(0)
    config = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        max_position_embeddings=args.seq_len,
    )
    student = LlamaForCausalLM(LlamaConfig(**config, num_key_value_heads=1))
    teacher = LlamaForCausalLM(LlamaConfig(**config, num_key_value_heads=4)).eval().requires_grad_(False)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))

    def step() -> None:
        if path == "full":
            logits = student(input_ids=ids).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            loss = 0.5 * token_losses(logits, ids) + 0.5 * distill_kl(logits, t_logits, 1.0)
        else:
            hidden = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            with torch.no_grad():
                t_hidden = teacher(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            loss, _ = chunked_loss(
                hidden,
                student.get_output_embeddings(),
                ids,
                t_hidden,
                teacher.get_output_embeddings(),
                0.5,
                1.0,
                args.chunk,
            )
        loss.backward()
        student.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline after step 1

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - base, "tokens_per_s": args.steps * args.batch * args.seq_len / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512, help="tokens per loss chunk (train.loss_chunk_tokens)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    results: dict[str, list[dict]] = {"full": [], "chunked": []}
    for _ in range(args.repeats):
        for path in results:
            done = subprocess.run(
                [sys.executable, __file__, "--one", path, *sys.argv[1:]], capture_output=True, text=True, check=True
            )
            results[path].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"one distillation step, vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.batch} x {args.seq_len} tokens, chunk {args.chunk}, fp32 CPU, median of {args.repeats}"
    )
    peak = {p: statistics.median(r["peak_bytes"] for r in rs) for p, rs in results.items()}
    speed = {p: statistics.median(r["tokens_per_s"] for r in rs) for p, rs in results.items()}
    for path in results:
        runs = ", ".join(f"{r['peak_bytes'] / 1e9:.2f}" for r in results[path])
        print(f"  {path:<8} peak {peak[path] / 1e9:6.2f} GB (runs {runs})   {speed[path]:8,.0f} tokens/s")
    print(
        f"  chunked / full: {peak['chunked'] / peak['full']:.3f}x the peak memory "
        f"({peak['full'] / peak['chunked']:.1f}x lower), {speed['chunked'] / speed['full']:.2f}x the tokens/s"
    )


if __name__ == "__main__":
    main()
