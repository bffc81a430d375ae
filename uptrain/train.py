"""The uptraining loop, in accelerate's order: Accelerator, data, model, optimizer, scheduler, prepare, loop.

One optimizer step consumes a window of ``grad_accum`` micro-batches per process.
The loss of a window is the sum of per-token losses divided by the tokens of the
whole window on all processes, so every token weighs the same whatever the
accumulation or process count (``backward_scale`` undoes what DDP and accelerate
divide by on their own).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvshrink.errors import KvshrinkError
from uptrain import checkpoints, data
from uptrain.loss import chunkable, chunked_loss, liger_loss, select_fused_loss
from uptrain.recipe import Recipe, RecipeError, schedule
from uptrain.summary import TrainingSummary


class TrainingError(KvshrinkError):
    """The run stopped (non-finite loss, out of memory): printed on one line, exit code 1."""

    exit_code = 1


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a (B, T) block: positions 0..T-2 predict 1..T-1.

    The labels are shifted (and the last position ignored) rather than the logits sliced, which
    would copy a (B, T, vocab) tensor.
    """
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed per-token KL(teacher || student) of the softened distributions, times T^2 (Hinton et al.)."""
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2


def backward_scale(accelerator) -> float:
    """What a window's summed loss is multiplied by (before dividing by the window's global tokens) so that the
    gradients after the window are the global per-token mean gradient.

    DDP and FSDP average gradients over processes (times num_processes undoes it), and
    ``Accelerator.backward`` divides every loss by ``gradient_accumulation_steps`` (except under DeepSpeed,
    which this loop does not use): times the steps undoes it, since the window's token count already
    normalizes. tests/test_uptrain.py pins both library behaviours.
    """
    return accelerator.num_processes * accelerator.gradient_accumulation_steps


def lr_at(step: int, recipe: Recipe, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine down to train.min_lr at the last step (a multiplier of lr)."""
    t = recipe.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Mean next-token loss, perplexity and scored tokens over the eval blocks, summed across processes."""
    from uptrain.evaluate import loss_sums, mean_loss

    loss, tokens = loss_sums(model, loader, accelerator.device)
    loss, tokens = accelerator.reduce(loss, "sum"), accelerator.reduce(tokens, "sum")
    result = mean_loss(loss.item(), int(tokens.item()))
    return {"eval_loss": result["loss"], "eval_ppl": result["ppl"], "eval_tokens": result["tokens"]}


def _precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(name, name)


def _model_path(recipe: Recipe, accelerator) -> str:
    """The student: recipe.model, or recipe.convert's source converted once into OUTPUT_DIR/converted."""
    if recipe.model:
        return recipe.model
    from convert import ConversionError, convert_checkpoint

    target = Path(recipe.output_dir) / "converted"
    if accelerator.is_main_process and not (target / "conversion.json").exists():
        try:
            convert_checkpoint(recipe.convert.source, target, convert_options(recipe), overwrite=True)
        except ConversionError as exc:
            raise RecipeError(f"convert: {exc}") from None
    accelerator.wait_for_everyone()
    return str(target)


def convert_options(recipe: Recipe):
    """The recipe's convert step as converter options. Calibrated methods without convert.calibration_data
    calibrate on data.train's local files, or, when it names none (a hub stream), on
    ``convert.calibration_tokens`` sampled from the source (uptrain.sample, into OUTPUT_DIR/calibration-samples)."""
    from convert.merge import METHODS
    from convert.options import ConvertOptions
    from kvshrink.text import local_files

    c = recipe.convert
    options = ConvertOptions(**{name: getattr(c, name) for name in ConvertOptions.fields()})
    if METHODS[c.method].calibrated and not c.calibration_data:
        files = [f for entry in recipe.data.train for f in (local_files(entry) or [])]
        if not files:
            from uptrain.sample import Sampling, cached_samples

            directory = Path(recipe.output_dir) / "calibration-samples"
            files = [str(cached_samples(c.source, directory, Sampling(tokens=c.calibration_tokens)))]
        options.calibration_data = files
    return options


def _load_model(path: str, what: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot load the {what} {path}: {str(exc).splitlines()[0]}") from None


def _set_trainable(model, mode: str) -> int:
    """Freeze all but the modules of ``mode`` (convert.roles.SUBSETS); returns the trainable parameter count."""
    if mode != "all":
        from convert.families import resolve

        try:
            _, spec = resolve(model.config.to_dict())
        except KeyError as exc:
            raise RecipeError(f"train.trainable: {mode} needs a family the converter knows; {exc.args[0]} is not "
                              f"one (use train.trainable: all)") from None
        if mode == "kv" and "qkv" in spec.tensors:
            raise RecipeError("train.trainable: kv needs separate k/v projections; this family fuses them "
                              "(use attention)")
        pattern = spec.parameter_pattern(mode)
        for name, p in model.named_parameters():
            p.requires_grad_(pattern.fullmatch(name) is not None)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: matrices decay; norms, biases and embeddings do not."""
    embeddings = {id(model.get_input_embeddings().weight)}  # also the tied output projection, if tied
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_inputs(recipe: Recipe, model, teacher) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and recipe.data.seq_len > limit:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} is beyond the model's {limit} positions")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise RecipeError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's "
                          f"({model.config.vocab_size}); distillation needs the same tokenizer")


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            kept = [line for line in self.read() if line["step"] <= resume_step] if resume_step else []
            path.write_text("".join(json.dumps(x) + "\n" for x in kept))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def run(recipe: Recipe) -> TrainingSummary:
    """Train as the recipe says; returns the summary (also printed by the CLI).

    The model and teacher paths are checked before anything is written; a run that fails (or is interrupted)
    before its first checkpoint removes the output directory it created.
    """
    for what, path in (("model", recipe.model), ("teacher", recipe.teacher)):
        if path:
            checkpoints.check_model(path, what)
    with checkpoints.removed_on_failure(Path(recipe.output_dir)):
        return _run(recipe)


def _accelerator(recipe: Recipe):
    """The Accelerator of a run: CPU (gloo) without a GPU, the recipe's precision, exact accumulation windows."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    t = recipe.train
    if recipe.log.tracker != "none":
        try:
            __import__(recipe.log.tracker)  # tensorboard or wandb (validated by the recipe)
        except ImportError:
            raise RecipeError(f"log.tracker {recipe.log.tracker} needs `pip install {recipe.log.tracker}`") from None
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # with several processes and no GPU: gloo on CPU
        mixed_precision=_precision(t.precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with=None if recipe.log.tracker == "none" else recipe.log.tracker,
        project_dir=str(recipe.output_dir),
        step_scheduler_with_optimizer=False,
    )


def _models(recipe: Recipe, accelerator, model_path: str):
    """(student in fp32 with its trainable subset, frozen teacher in the compute dtype or None, the student's
    source dtype, the trainable parameter count)."""
    t = recipe.train
    model = _load_model(model_path, "model")
    source_dtype = next(model.parameters()).dtype
    model = model.float()  # master weights in fp32; autocast gives bf16/fp16 compute
    teacher = None
    if recipe.teacher:
        # The teacher is not sharded: every process needs all its weights. FSDP's RAM-efficient loading
        # (recipes/accelerate/fsdp.yaml) would leave them on the meta device outside process 0.
        from accelerate.utils import patch_environment

        with patch_environment(fsdp_cpu_ram_efficient_loading="false"):
            teacher = _load_model(recipe.teacher, "teacher")
    _check_inputs(recipe, model, teacher)
    trainable = _set_trainable(model, t.trainable)
    if t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if teacher is not None:  # the student's compute dtype, on its device, frozen
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        teacher.to(accelerator.device, compute).eval().requires_grad_(False)
    return model, teacher, source_dtype, trainable


def _data(recipe: Recipe, accelerator, model_path: str):
    """(tokenizer, train blocks, eval blocks): one process tokenizes, the others read its cache."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise checkpoints.tokenizer_error(model_path, exc) from None
    with accelerator.main_process_first():
        train_set, eval_set = data.build_datasets(recipe, tokenizer)
    return tokenizer, train_set, eval_set


def _prepared(recipe: Recipe, accelerator, model, resume_from: Path | None) -> int:
    """After accelerate's prepare: the tied-weights save hook, torch.compile, the resumed state; the start step."""
    accelerator.register_save_state_pre_hook(checkpoints.save_tied_once)
    if recipe.train.compile:
        compile_student(accelerator, model, recipe.train.compile_backend)
    if resume_from is None:
        return 0
    accelerator.load_state(str(resume_from))
    return checkpoints.read_state(resume_from)["step"]


def _run(recipe: Recipe) -> TrainingSummary:
    from accelerate.utils import set_seed

    out = Path(recipe.output_dir)
    t = recipe.train
    tasks = _check_tasks(recipe)  # before anything runs: a bad task name stops here
    accelerator = _accelerator(recipe)
    select_fused_loss(t.fused_loss, accelerator.device.type, biased_distill=False)  # fail before loading anything
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoints.find_resume(out, recipe.resume)
    set_seed(t.seed)

    model_path = _model_path(recipe, accelerator)
    tokenizer, train_set, eval_set = _data(recipe, accelerator, model_path)
    before = downstream_scores(tasks, model_path, accelerator) if recipe.eval.tasks_before and not resume_from else {}
    model, teacher, source_dtype, trainable = _models(recipe, accelerator, model_path)

    # Optimizer, scheduler
    tokens_per_step, total_steps = schedule(recipe, accelerator.num_processes)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  fused=accelerator.device.type in ("cuda", "cpu"))  # one kernel, not a loop
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, recipe, total_steps))

    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=data.collate)
    model, optimizer, scheduler, eval_loader = accelerator.prepare(model, optimizer, scheduler, eval_loader)
    start_step = _prepared(recipe, accelerator, model, resume_from)
    if recipe.log.tracker != "none":
        accelerator.init_trackers(out.name, config=tracker_config(asdict(recipe)))
    metrics = MetricsLog(out / "metrics.jsonl", start_step, main)
    if before:
        metrics.write({"step": 0, "tokens": 0, **before})
        accelerator.log(before, step=0)
    if main:
        print(f"uptrain: {model_path} -> {out}: {total_steps} steps of {tokens_per_step:,} tokens, "
              f"{trainable:,} trainable parameters, {accelerator.num_processes} process(es) "
              f"({accelerator.distributed_type.value}) on {accelerator.device.type}, precision "
              f"{accelerator.mixed_precision}" + (f", resuming from {resume_from.name}" if resume_from else ""))

    # Loop
    loop = _Loop(recipe, accelerator, model, teacher, optimizer, scheduler, eval_loader, metrics, total_steps,
                 tokens_per_step)
    batches = data.train_batches(train_set, t.micro_batch_size, t.seed, accelerator, start=start_step * t.grad_accum)
    summary = loop.train(batches, start_step)

    final = out / "final"
    checkpoints.save_final(accelerator, model, tokenizer, model_path, final, source_dtype)
    after = downstream_scores(tasks, str(final), accelerator)  # main process only; the others end meanwhile
    if after:
        metrics.write({"step": summary.steps, "tokens": summary.tokens, **after})
        accelerator.log(after, step=summary.steps)
        summary.downstream_before, summary.downstream = before, after
    accelerator.end_training()
    if main:
        _plot(recipe, metrics, summary, final)
    return summary


def _plot(recipe: Recipe, metrics: MetricsLog, summary: TrainingSummary, final: Path) -> None:
    from uptrain.plot import plot_metrics

    out = Path(recipe.output_dir)
    plot_metrics(metrics.read(), out / "training.png", recipe.data.seq_len)
    summary.final, summary.plot = str(final), str(out / "training.png")


def compile_student(accelerator, model, backend: str) -> None:
    """torch.compile the prepared student in place (``nn.Module.compile``), after accelerate's wrappers.

    Not accelerate's dynamo plugin, which wraps the model in an OptimizedModule: save_state then writes
    ``_orig_mod.``-prefixed keys, and ``unwrap_model`` keeps the wrapper by default (so would the final
    checkpoint). Compiling the inner module in place leaves the module tree, its state-dict keys, DDP's wrapper,
    save_state/load_state and unwrap_model as they were; only its forward call runs compiled.
    """
    accelerator.unwrap_model(model).compile(backend=backend)


def tracker_config(values: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The recipe as a tracker's hyperparameters: dotted keys and scalar values, lists and None as JSON text
    (tensorboard's ``add_hparams`` refuses anything else)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(tracker_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _check_tasks(recipe: Recipe):
    """The recipe's downstream tasks (uptrain.downstream.Tasks), checked, or None when it names none."""
    if not recipe.eval.tasks:
        return None
    from uptrain import downstream

    e = recipe.eval
    limit = None if e.tasks_limit is None else (int(e.tasks_limit) if e.tasks_limit >= 1 else e.tasks_limit)
    return downstream.load_tasks(e.tasks, e.tasks_num_fewshot, limit, recipe.train.micro_batch_size)


def downstream_scores(tasks, path: str, accelerator) -> dict[str, float]:
    """The tasks on the checkpoint at `path`, on the main process, as flat metrics ``downstream/TASK/METRIC``
    (and ``..._stderr``); {} without tasks or on the other processes."""
    if tasks is None or not accelerator.is_main_process:
        return {}
    from transformers import AutoTokenizer

    from uptrain import downstream

    model = _load_model(path, "model").to(accelerator.device).eval()
    scores = downstream.evaluate(model, AutoTokenizer.from_pretrained(path), tasks)
    flat = {}
    for name, score in scores.items():
        flat[f"downstream/{name}/{score.metric}"] = score.value
        if score.stderr is not None:
            flat[f"downstream/{name}/{score.metric}_stderr"] = score.stderr
    print("downstream " + ", ".join(f"{k.removeprefix('downstream/')} {v:.4f}" for k, v in flat.items()
                                    if not k.endswith("_stderr")), flush=True)
    return flat


def loss_chunk(recipe: Recipe, accelerator, model, teacher) -> int:
    """Tokens per loss chunk, or 0 for the full-logits path: when the recipe asks for it, under FSDP (whose
    sharded lm_head weight the chunked loss cannot read) and where logits are scaled after the lm_head."""
    from accelerate.utils import DistributedType

    models = [accelerator.unwrap_model(model)] + ([teacher] if teacher is not None else [])
    if accelerator.distributed_type == DistributedType.FSDP or not all(chunkable(m) for m in models):
        return 0
    return recipe.train.loss_chunk_tokens


class _Loop:
    """The optimizer-step loop with its logging, evaluation and checkpoints."""

    def __init__(self, recipe, accelerator, model, teacher, optimizer, scheduler, eval_loader, metrics,
                 total_steps, tokens_per_step):
        self.r, self.acc, self.model, self.teacher = recipe, accelerator, model, teacher
        self.optimizer, self.scheduler, self.eval_loader, self.metrics = optimizer, scheduler, eval_loader, metrics
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.step, self.grad_norm = 0, float("nan")
        self.chunk = loss_chunk(recipe, accelerator, model, teacher)
        heads = [accelerator.unwrap_model(model)] + ([teacher] if teacher is not None else [])
        biased = teacher is not None and any(m.get_output_embeddings().bias is not None for m in heads)
        self.fused = select_fused_loss(recipe.train.fused_loss, accelerator.device.type, biased)

    def window_loss(self, window: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over one accumulation window; returns the window's (loss, CE) sums per token."""
        acc, r = self.acc, self.r
        tokens = torch.tensor(sum(b["input_ids"][:, 1:].numel() for b in window), device=acc.device,
                              dtype=torch.float64)
        tokens = acc.reduce(tokens, "sum")
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        ce_total = torch.zeros_like(total)
        window_loss = None  # set at the sync, which the window's last micro-batch always is
        for batch in window:
            with acc.accumulate(self.model):
                loss, ce = self.micro_batch_loss(batch["input_ids"])
                acc.backward(loss * backward_scale(acc) / tokens.float())
                total += loss.detach().double()
                ce_total += ce.detach().double()
                if acc.sync_gradients:  # the window's last micro-batch: total is complete
                    window_loss = acc.reduce(total.clone(), "sum") / tokens
                    self.check_finite(window_loss)
                    self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), r.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return window_loss, acc.reduce(ce_total, "sum") / tokens

    def micro_batch_loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, CE) sums of one micro-batch: chunked from hidden states (uptrain.loss) where exact, else full."""
        r, acc, w = self.r, self.acc, self.r.distill.weight
        if self.chunk:
            hidden = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            teacher_hidden = None
            if w > 0:
                teacher_hidden = self.teacher_output(ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                if teacher_hidden.is_inference():  # (B, T, H): a cheap copy out of inference mode for autograd
                    teacher_hidden = teacher_hidden.clone()
            head = acc.unwrap_model(self.model).get_output_embeddings()
            teacher_head = None if w == 0 else self.teacher.get_output_embeddings()
            if self.fused == "liger":
                return liger_loss(hidden, head, ids, teacher_hidden, teacher_head, w, r.distill.temperature)
            return chunked_loss(hidden, head, ids, teacher_hidden, teacher_head, w, r.distill.temperature,
                                self.chunk)
        logits = self.model(input_ids=ids).logits
        ce = token_losses(logits, ids)
        if w == 0:
            return ce, ce.detach()
        # Not copied out of inference mode: (B, T, vocab); distill_kl only reads it, never saves it for backward.
        teacher_logits = self.teacher_output(ids).logits
        return (1 - w) * ce + w * distill_kl(logits, teacher_logits, r.distill.temperature), ce.detach()

    def teacher_output(self, ids: torch.Tensor, **kwargs):
        """The teacher's forward in the compute dtype, under no_grad, or inference_mode where the recipe says
        (distill.teacher_inference_mode: no version counters or autograd metadata on its tensors)."""
        no_grad = torch.inference_mode() if self.r.distill.teacher_inference_mode else torch.no_grad()
        with no_grad, self.acc.autocast():
            return self.teacher(input_ids=ids, **kwargs)

    def save(self) -> None:
        """A checkpoint of this step; a full or read-only disk stops the run naming the last complete one."""
        out = Path(self.r.output_dir)
        try:
            checkpoints.save(self.acc, out, self.step, self.r.save.keep_last)
        except OSError as exc:
            from kvshrink.errors import os_error_line

            last = checkpoints.newest(out)
            keep = f"the last complete checkpoint, {last}, is intact: rerun to resume from it" if last else \
                "no complete checkpoint was written yet"
            raise TrainingError(f"saving the step-{self.step} checkpoint failed "
                                f"({os_error_line(exc).removeprefix('error: ')}); {keep}") from None

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            last = checkpoints.newest(Path(self.r.output_dir))
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"the loss became {loss.item()} at step {self.step + 1}; stopped before the update; "
                                f"{keep}. Lower train.lr or check the data")

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def eval_now(self) -> dict[str, float]:
        result = evaluate(self.model, self.eval_loader, self.acc)
        self.log({"step": self.step, "tokens": self.step * self.tokens_per_step, **result})
        if self.acc.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step}: eval perplexity {result['eval_ppl']:.2f} (loss {result['eval_loss']:.4f}) "
                       f"on {result['eval_tokens']:,} tokens in {self.r.data.seq_len}-token blocks", file=sys.stdout)
        return result

    def train(self, batches, start_step: int) -> TrainingSummary:
        from tqdm.auto import tqdm

        r, acc = self.r, self.acc
        self.step = start_step
        first_eval = next((m for m in self.metrics.read() if "eval_ppl" in m), None)
        if self.step == 0 or first_eval is None:
            first_eval = self.eval_now()
        self.model.train()
        lines = acc.is_main_process and not sys.stderr.isatty()  # logs get a line per log step, terminals a bar
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not acc.is_main_process or lines,
                   desc="uptrain", unit="step")
        started, interval_start, interval_tokens = time.perf_counter(), time.perf_counter(), 0
        last_eval, trained_tokens = None, 0
        try:
            while self.step < self.total_steps:
                window = [next(batches) for _ in range(r.train.grad_accum)]
                loss, ce = self.window_loss(window)
                self.scheduler.step()
                self.step += 1
                trained_tokens += self.tokens_per_step
                interval_tokens += self.tokens_per_step
                if self.step % r.log.every_steps == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    record = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss.item(),
                              "ce": ce.item(), "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": float(self.grad_norm),
                              "tokens_per_s": interval_tokens / (now - interval_start)}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:,.0f}")
                    if lines:
                        print(f"step {self.step}/{self.total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                              f"{record['tokens_per_s']:,.0f} tokens/s", flush=True)
                    interval_start, interval_tokens = now, 0
                if self.step % r.eval.every_steps == 0 or self.step == self.total_steps:
                    last_eval = self.eval_now()
                    self.model.train()
                if self.step % r.save.every_steps == 0 or self.step == self.total_steps:
                    self.save()
                bar.update(1)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of GPU memory at train.micro_batch_size={r.train.micro_batch_size}, data.seq_len="
                f"{r.data.seq_len}: lower train.micro_batch_size (raise train.grad_accum to keep the batch), "
                "set train.gradient_checkpointing=true, or shorten data.seq_len") from None
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        if last_eval is None:  # resumed a run that had already finished: its last eval is in the log
            last_eval = next((m for m in reversed(self.metrics.read()) if "eval_ppl" in m), first_eval)
        return TrainingSummary(eval_ppl_before=first_eval["eval_ppl"], eval_ppl_after=last_eval["eval_ppl"],
                               steps=self.step, tokens=self.step * self.tokens_per_step, seconds=seconds,
                               tokens_per_s=trained_tokens / seconds if seconds else 0.0)
