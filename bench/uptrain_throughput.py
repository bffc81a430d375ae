"""Training throughput and peak memory of `python -m uptrain`'s loop against transformers' Trainer, side by side.

    python bench/uptrain_throughput.py                 # CPU (fp32), a 12M-parameter MQA Llama
    python bench/uptrain_throughput.py --hidden 2048 --layers 16 --heads 32 --seq-len 2048 --micro-batch 4
    python bench/uptrain_throughput.py --variants default compile bf16 distill distill-inference   # compute options

Both train the same model (random init, the same converted MQA checkpoint), on the same packed
blocks of real text (Python's documentation), with the same micro-batch, accumulation, optimizer
(AdamW), schedule and precision (bf16 on a GPU that has it, else fp32). Each runs in its own
process, alternately, `--repeats` times; tokens/s is measured from the end of step `--warmup` to
the last step (the Trainer from per-step callback timestamps, the uptrain loop from its own
metrics.jsonl, logged every `--warmup` steps), and the median is printed. Peak memory is the process's
peak resident set on the CPU (Python and torch included, the same for every row) and torch's peak allocated
memory on a GPU. `--variants` adds rows of the uptrain loop with one recipe option changed each (VARIANTS).
On a GPU the model FLOPs utilization is printed too (6 N tokens/s plus attention, over the peak
given by --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (row label, recipe sections changed); "distill*" rows add the MHA original as the teacher.
VARIANTS = {
    "default": ("uptrain loop", {}),
    "compile": ("uptrain loop, compile", {"train": {"compile": True}}),
    "fp32": ("uptrain loop, fp32", {"train": {"precision": "fp32"}}),
    "bf16": ("uptrain loop, bf16", {"train": {"precision": "bf16"}}),
    "chunked": ("uptrain loop, fused_loss off", {"train": {"fused_loss": "off"}}),
    "distill": ("uptrain loop, distill", {"distill": {"weight": 0.5, "temperature": 1.0}}),
    "distill-inference": (
        "uptrain loop, distill, inference_mode",
        {"distill": {"weight": 0.5, "temperature": 1.0, "teacher_inference_mode": True}},
    ),
}


def peak_memory_gb() -> float:
    """This process's peak: torch's allocated memory on a GPU, else the resident set (Linux reports KiB)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(work: Path, args) -> tuple[Path, Path]:
    """A converted MQA model with a trained tokenizer, and the training text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert import convert_checkpoint
    from uptrain.corpus import train_tokenizer, write_corpus

    train, _ = write_corpus(work / "text")
    tokenizer = train_tokenizer(train, vocab_size=args.vocab)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max(2048, args.seq_len),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(work / "mha")
    tokenizer.save_pretrained(work / "mha")
    convert_checkpoint(work / "mha", work / "mqa", kv_heads=args.kv_heads)
    return work / "mqa", train


def ours(work: Path, model: Path, text: Path, args, variant: str) -> dict:
    """The uptrain loop in this process (what `python -m uptrain` runs), with VARIANTS[variant]'s options."""
    import yaml

    from uptrain.recipe import load_recipe
    from uptrain.train import run

    recipe = {
        "model": str(model),
        "output_dir": str(work / "ours"),
        "resume": "never",
        "data": {"train": [str(text)], "eval": [str(text)], "seq_len": args.seq_len},
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "grad_accum": args.grad_accum,
            "lr": 3e-4,
            "min_lr": 3e-5,
            "warmup_steps": 2,
        },
        "eval": {"every_steps": args.steps, "max_tokens": args.seq_len},
        "save": {"every_steps": args.steps, "keep_last": 1},
        "log": {"every_steps": args.warmup},
    }
    for section, values in VARIANTS[variant][1].items():
        recipe[section] = {**recipe.get(section, {}), **values}
    if "compile" in recipe["train"]:
        recipe["train"]["compile_backend"] = args.compile_backend
    if variant.startswith("distill"):  # the MHA original teaches: one more forward pass per step
        recipe["teacher"] = str(model.parent / "mha")
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(recipe))
    shutil.rmtree(work / "ours", ignore_errors=True)  # each repeat starts fresh
    run(load_recipe(path))
    # metrics.jsonl logs every `warmup` steps with that interval's tokens/s (as rarely as the Trainer
    # logs here, per-step logging would cost time the Trainer does not spend); the first interval is
    # the warm-up.
    records = [json.loads(x) for x in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    intervals = [r for r in records if "loss" in r][1:]
    steps = [b["step"] - a["step"] for a, b in zip([{"step": args.warmup}] + intervals, intervals)]
    seconds = sum(n * args.tokens_per_step / r["tokens_per_s"] for n, r in zip(steps, intervals))
    return {"tokens_per_s": sum(steps) * args.tokens_per_step / seconds, "peak_gb": peak_memory_gb()}


def trainer(work: Path, model_path: Path, text: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from uptrain import data

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    blocks = data.pack(data.load_documents([str(text)], "text"), tokenizer, "text", args.seq_len)
    blocks = blocks.map(lambda b: {"labels": b["input_ids"]}, batched=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    targs = TrainingArguments(
        output_dir=str(work / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=bf16,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    Trainer(model=model, args=targs, train_dataset=blocks, callbacks=[Stamp()]).train()
    stamps = stamps[args.warmup - 1 :]  # from the end of step `warmup`
    return {
        "tokens_per_s": (len(stamps) - 1) * args.tokens_per_step / (stamps[-1] - stamps[0]),
        "peak_gb": peak_memory_gb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1, help="KV heads of the converted model (default: 1, MQA)")
    parser.add_argument(
        "--distill", action="store_true", help="also time the uptrain loop distilling from the original"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["default"],
        help="uptrain loop rows, one recipe option changed each (default: default)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="train.compile_backend of the compile row",
    )
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--one", nargs=3, metavar=("WHICH", "WORK", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len
    if args.one:
        which, work, model = args.one
        work, text = Path(work), Path(work) / "text" / "train.txt"
        result = (
            trainer(work, Path(model), text, args) if which == "trainer" else ours(work, Path(model), text, args, which)
        )
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="uptrain-bench-"))
    model, _ = build(work, args)
    variants = args.variants + (["distill"] if args.distill and "distill" not in args.variants else [])
    runs = [("transformers Trainer", "trainer")] + [(VARIANTS[v][0], v) for v in variants]
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(args.repeats):
        for name, which in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", which, str(work), str(model), *sys.argv[1:]],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: {results[name][-1]}", flush=True)  # as it comes: a long run cut short keeps these
    print_table(results, model, args)


def print_table(results: dict[str, list[dict]], model: Path, args) -> None:
    """One row per run kind: median tokens/s, its ratio to the Trainer, median peak memory, MFU on a GPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    memory = "peak allocated" if torch.cuda.is_available() else "peak RSS"
    print(
        f"\n{params / 1e6:.1f}M-parameter Llama with {args.kv_heads} KV heads, seq_len {args.seq_len}, "
        f"micro-batch {args.micro_batch} x accumulation {args.grad_accum}, {args.steps} steps ({args.warmup} "
        f"warm-up), median of {args.repeats}; {device}"
    )
    base = statistics.median(r["tokens_per_s"] for r in results["transformers Trainer"])
    width = max(map(len, results))
    for name, runs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        line = (
            f"  {name:<{width}} {tps:12,.0f} tokens/s  ({tps / base:.2f}x Trainer)  {memory} "
            f"{statistics.median(r['peak_gb'] for r in runs):6.2f} GB  (runs: "
            + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
            + ")"
        )
        if torch.cuda.is_available():
            flops = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len
            line += f"  MFU {tps * flops / (args.peak_tflops * 1e12):.1%}"
            if "distill" in name:  # the teacher's forward pass (2N + attention) counted separately
                teacher = (2 * params + 4 * config.num_hidden_layers * config.hidden_size * args.seq_len) * tps
                line += f" + teacher forward {teacher / (args.peak_tflops * 1e12):.1%}"
        print(line)


if __name__ == "__main__":
    main()
