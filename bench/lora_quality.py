"""Recovery on SmolLM2-135M-Instruct MQA: full attention training against LoRA, at the demo's token budget.

Each configuration starts from the demo's recommended (aware) MQA conversion and runs the demo's recipe
(``recipes/demo-smollm2-mqa.yaml``: 30 steps of 4 x 256 tokens sampled from the original, distilled from it with
weight 0.5) in a process of its own, changed only as the table says:

- (a) full attention training, as the demo does (``trainable: attention``, lr 3e-4);
- (b) LoRA r 16 (alpha 32) on q, k, v, o, everything else frozen (lr 1e-3, the usual LoRA rate);
- (c) ``trainable: kv`` with LoRA r 16 on q and o (lr 3e-4: it trains K and V fully);
- (d) LoRA r 64 (alpha 128, the same alpha / r) on q, k, v, o (lr 1e-3).

The final checkpoints are scored as the demo scores them (``uptrain.perplexity.perplexities``: the first 4,096
tokens of the held-out tragedies and of the CPython docs, blocks of 512). Peak RSS is the run's process's; the
``--dry-run`` plan of each recipe is printed beside it.

    python bench/lora_quality.py --demo-run runs/demo --work /tmp/lora-quality

``--demo-run`` is a demo output directory (``python -m kvshrink.demo --out DIR``) holding ``mqa-aware``; the
original and the samples come from the demo's cache (``kvshrink.assets``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, when run from anywhere
from lora_scale import measured  # noqa: E402

CONFIGS = {
    "a": ("full attention", ["train.trainable=attention"]),
    "b": (
        "LoRA r16 q,k,v,o",
        [
            "train.trainable=none",
            "lora={r: 16, alpha: 32, targets: [q, k, v, o]}",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
        ],
    ),
    "c": ("kv full + LoRA r16 q,o", ["train.trainable=kv", "lora={r: 16, alpha: 32, targets: [q, o]}"]),
    "d": (
        "LoRA r64 q,k,v,o",
        [
            "train.trainable=none",
            "lora={r: 64, alpha: 128, targets: [q, k, v, o]}",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
        ],
    ),
}


def demo_recipe(demo_run: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """(work/recipe.yaml, the two scored texts): the demo's recipe on its recommended MQA conversion, distilled
    from the original on the demo's samples, every run's own output_dir left to an override."""
    from kvshrink import assets
    from kvshrink_base.sample import Sampling, cached_samples

    base = yaml.safe_load((files("kvshrink_recipes") / "demo-smollm2-mqa.yaml").read_text())
    original = assets.smollm2()
    samples = cached_samples(
        str(original),
        assets.cache_dir() / "smollm2-135m-instruct-samples",
        Sampling(tokens=30_720, batch_size=64, length=320),
    )
    texts = {"eval": assets.shakespeare()["eval"], "off-domain": assets.cpython_docs()}
    base.update(model=str(demo_run / "mqa-aware"), teacher=str(original), resume="never")
    base["data"].update(train=[str(samples)], eval=[str(texts["eval"])])
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path, texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-run", type=Path, required=True, help="a demo output directory with mqa-aware")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    from uptrain.perplexity import perplexities

    args.work.mkdir(parents=True, exist_ok=True)
    path, texts = demo_recipe(args.demo_run, args.work)
    print("| config | trainable parameters | eval ppl | off-domain ppl | peak RSS GB | plan GB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for key in args.configs:
        name, overrides = CONFIGS[key]
        out = args.work / key
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"output_dir={out}", *overrides]
        plan = measured([sys.executable, "-m", "uptrain", str(path), *overrides, "--dry-run"])[2]
        wall, rss, stdout = measured([sys.executable, "-m", "uptrain", str(path), *overrides])
        trainable = re.search(r"([\d,]+) trainable parameters", stdout)[1]
        seconds = re.search(r"time \(this run\)\s+([\d.]+) s", stdout)[1]
        ppl = perplexities(out / "final", texts, 512, 4096)
        planned = re.search(r"peak\s+([\d.]+) GB", plan)[1]
        print(
            f"| ({key}) {name} | {trainable} | {ppl['eval']:.2f} | {ppl['off-domain']:.2f} | {rss:.2f} | "
            f"{planned} | {float(seconds):.0f} (loop), {wall:.0f} (process) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
