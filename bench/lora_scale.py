"""LoRA recovery of a Llama-2-7B-shaped checkpoint on one machine, and the merge, with their peak memory.

The synthetic bf16 source of ``bench/calibration_scale.py`` (hidden 4096, 32 layers, MHA, SmolLM2's tokenizer)
is converted to GQA-8 by mean pooling, then LoRA-uptrained (r 16 on q, k, v, o; ``train.trainable: none``) for
``--steps`` steps at seq 256, micro-batch 1, with gradient checkpointing; each in a process of its own, whose
peak RSS is measured. The adapters are then merged again by ``python -m uptrain.merge`` alone, so its peak is
the merge's, not the run's. ``--dry-run``'s plan is printed beside the measured peak, and the plan of full
attention training (``train.trainable: attention``, no adapters) beside it.

    python bench/lora_scale.py --work /tmp/scale --steps 3

Disk: 13.5 GB for the source, 12 GB for the GQA-8 checkpoint, 12 GB for a merged output (one at a time).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, when run from anywhere
from calibration_scale import RSS, write_source  # noqa: E402


def measured(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout) of a command in a process of its own."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS, *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, int(re.search(r"peak_rss_kb (\d+)", done.stderr)[1]) * 1024 / 1e9, done.stdout


def recipe(model: Path, out: Path, text: dict, steps: int) -> dict:
    return {
        "model": str(model),
        "output_dir": str(out),
        "resume": "never",
        "data": {"train": [str(text["train"])], "eval": [str(text["eval"])], "seq_len": 256},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "lr": 1.0e-4,
            "min_lr": 1.0e-5,
            "warmup_steps": 1,
            "trainable": "none",
            "gradient_checkpointing": True,
        },
        "lora": {"r": 16, "alpha": 32, "targets": ["q", "k", "v", "o"]},
        "eval": {"every_steps": 1000, "max_tokens": 256},
        "save": {"every_steps": 1000, "keep_last": 1},
        "log": {"every_steps": 1},
    }


def plan_peak(path: Path, *overrides: str) -> str:
    """The peak row of ``--dry-run``'s plan, in GB."""
    done = subprocess.run(
        [sys.executable, "-m", "uptrain", str(path), *overrides, "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    return re.search(r"peak\s+([\d.]+) GB", done.stdout)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="directory for the checkpoints")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    from kvshrink.assets import shakespeare, smollm2

    source, gqa = args.work / "src-32", args.work / "gqa8-mean"
    if not source.exists():
        write_source(source, smollm2())
    if not (gqa / "config.json").exists():
        wall, rss, _ = measured(
            [sys.executable, "-m", "convert", str(source), str(gqa), "--kv-heads", "8", "--overwrite"]
        )
        print(f"convert to GQA-8 by mean: {wall:.0f} s, peak RSS {rss:.2f} GB")
    out = args.work / "lora-run"
    shutil.rmtree(out, ignore_errors=True)
    path = args.work / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe(gqa, out, shakespeare(), args.steps)))
    lora_plan, full_plan = plan_peak(path), plan_peak(path, "lora=null", "train.trainable=attention")
    wall, rss, stdout = measured([sys.executable, "-m", "uptrain", str(path)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [256 / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    trainable = re.search(r"([\d,]+) trainable parameters", stdout)[1]
    shutil.rmtree(out / "final")  # room for the merge alone
    merged = args.work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    merge_wall, merge_rss, _ = measured(
        [sys.executable, "-m", "uptrain.merge", str(out / "final-adapter"), str(gqa), str(merged)]
    )
    shutil.rmtree(merged)
    print("\n| | exit | peak RSS GB | plan GB | time |")
    print("|---|---|---|---|---|")
    print(
        f"| LoRA r 16 q/k/v/o, {trainable} trainable, {args.steps} steps | 0 | {rss:.2f} | {lora_plan} | "
        f"{wall:.0f} s in all; s/step {', '.join(f'{s:.0f}' for s in step_s)} |"
    )
    print(f"| merge (python -m uptrain.merge) | 0 | {merge_rss:.2f} | — | {merge_wall:.0f} s |")
    print(f"| full attention training (plan only) | — | — | {full_plan} | — |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
