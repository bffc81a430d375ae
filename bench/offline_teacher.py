"""Offline distillation (``distill.mode: offline``) against online, and the 7B-shaped pipeline on one machine.

``--smollm2``: the demo's recipe (``recipes/demo-smollm2-mqa.yaml``: 30 steps of 4 x 256 tokens sampled from
the original, distilled at weight 0.5, attention projections trained) from the demo's recommended (aware) MQA
conversion, distilled online (the teacher beside the student) and offline at top-k 16, 64 and 256: the same
blocks, the same steps. Each run is a process of its own; offline runs compute their teacher files first
(``--teacher-only``, timed and measured apart), then train on them. Scored as the demo scores (the first 4,096
tokens of the held-out tragedies and of the CPython docs, blocks of 512).

    python bench/offline_teacher.py --smollm2 --demo-run runs/demo --work /tmp/offline

``--scale``: the synthetic Llama-2-7B-shaped bf16 checkpoint of ``bench/calibration_scale.py`` is the teacher,
its GQA-8 mean conversion (``bench/lora_scale.py`` makes it) the student: the teacher pass over the 4 blocks of
256 tokens that 3 steps of micro-batch 1 train on, then those 3 LoRA steps (r 16, q/k/v/o, gradient
checkpointing) distilled offline at k 64.

    python bench/offline_teacher.py --scale --work /tmp/scale
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, when run from anywhere
from lora_quality import demo_recipe  # noqa: E402
from lora_scale import measured  # noqa: E402
from lora_scale import recipe as lora_recipe

OFFLINE = {"online": None, "offline k16": 16, "offline k64": 64, "offline k256": 256}


def teacher_then_train(path: Path, overrides: list[str], offline: bool) -> dict:
    """The run's figures: the teacher pass apart (offline), then training."""
    figures = {"teacher_s": 0.0, "teacher_rss": 0.0, "teacher_mb": 0.0}
    if offline:
        wall, rss, said = measured([sys.executable, "-m", "uptrain", str(path), *overrides, "--teacher-only"])
        walked = [float(s) for s in re.findall(r"teacher: layer \d+/\d+ \((\d+) s\)", said)]
        figures["s_per_layer"] = walked[-1] / len(walked) if walked else 0.0
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        written = sum(p.stat().st_size for p in (out / "teacher").iterdir())
        figures.update(teacher_s=wall, teacher_rss=rss, teacher_mb=written / 1e6)
    wall, rss, stdout = measured([sys.executable, "-m", "uptrain", str(path), *overrides])
    loop = float(re.search(r"time \(this run\)\s+([\d.]+) s", stdout)[1])
    figures.update(train_s=loop, train_wall=wall, train_rss=rss, stdout=stdout)
    return figures


def smollm2(args) -> None:
    from uptrain.perplexity import perplexities

    path, texts = demo_recipe(args.demo_run, args.work)
    print(
        "| distillation | eval ppl | off-domain ppl | teacher pass s | training s | teacher files MB | "
        "peak RSS GB (pass, training) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, k in OFFLINE.items():
        if args.runs and name.replace(" ", "-") not in args.runs:
            continue
        out = args.work / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"output_dir={out}"] + ([] if k is None else ["distill.mode=offline", f"distill.top_k={k}"])
        f = teacher_then_train(path, overrides, k is not None)
        ppl = perplexities(out / "final", texts, 512, 4096)
        print(
            f"| {name} | {ppl['eval']:.2f} | {ppl['off-domain']:.2f} | {f['teacher_s']:.0f} | {f['train_s']:.0f} | "
            f"{f['teacher_mb']:.1f} | {f['teacher_rss']:.2f}, {f['train_rss']:.2f} |",
            flush=True,
        )


def scale(args) -> None:
    from kvshrink.assets import shakespeare

    source, gqa = args.work / "src-32", args.work / "gqa8-mean"
    if not (gqa / "config.json").exists():
        raise SystemExit(f"{gqa} is missing: run bench/lora_scale.py --work {args.work} first")
    out = args.work / "offline-run"
    shutil.rmtree(out, ignore_errors=True)
    raw = lora_recipe(gqa, out, shakespeare(), 3)
    raw.update(teacher=str(source), distill={"weight": 0.5, "mode": "offline", "top_k": 64})
    path = args.work / "offline.yaml"
    path.write_text(yaml.safe_dump(raw))
    f = teacher_then_train(path, [f"output_dir={out}"], True)
    print("| stage | peak RSS GB | seconds |")
    print("|---|---|---|")
    print(
        f"| teacher pass, 4 blocks of 256 tokens through 32 layers | {f['teacher_rss']:.2f} | "
        f"{f['teacher_s']:.0f} in all, {f['s_per_layer']:.1f} a layer |"
    )
    print(
        f"| 3 LoRA steps, offline k 64 | {f['train_rss']:.2f} | {f['train_s']:.0f} (loop), {f['train_wall']:.0f} "
        "(process) |"
    )
    print(f"teacher files: {f['teacher_mb']:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--demo-run", type=Path, help="a demo output directory with mqa-aware (--smollm2)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=[n.replace(" ", "-") for n in OFFLINE],
        help="--smollm2: these rows only (default: all)",
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.smollm2:
        smollm2(args)
    if args.scale:
        scale(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
