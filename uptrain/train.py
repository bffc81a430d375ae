"""The uptraining loop, in accelerate's order: Accelerator, data, model, optimizer, scheduler, prepare, loop.

One optimizer step consumes a window of ``grad_accum`` micro-batches per process.
The loss of a window is the sum of per-token losses divided by the tokens of the
whole window on all processes, so every token weighs the same whatever the
accumulation or process count (``backward_scale`` undoes what DDP and accelerate
divide by on their own). The losses are ``uptrain.loss``'s, the models ``uptrain.student``'s, the in-loop eval
``uptrain.perplexity``'s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from tqdm.auto import tqdm

from convert.source import resolve_source
from kvshrink_base.device import pick_device
from kvshrink_base.errors import os_error_line
from kvshrink_base.models import load_tokenizer
from kvshrink_base.text import check_entries
from uptrain import checkpoints, data, downstream, merge, student
from uptrain import teacher as teacher_files
from uptrain.errors import RecipeError, TrainingError
from uptrain.loss import (
    Stored,
    chunked_loss,
    distill_kl,
    liger_loss,
    loss_chunk,
    select_fused_loss,
    stored_distill_kl,
    token_losses,
)
from uptrain.metrics import MetricsLog, tracker_config
from uptrain.perplexity import eval_metrics
from uptrain.plan import RunShape, config_dtype, memory_plan, precision
from uptrain.plot import plot_metrics
from uptrain.recipe import Recipe, lr_at, schedule
from uptrain.summary import TrainingSummary

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator, PartialState
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from kvshrink_base.text import HFDataset

__all__ = ["TrainingError", "backward_scale", "check_paths", "run"]


def backward_scale(accelerator: Accelerator) -> float:
    """What a window's summed loss is multiplied by (before dividing by the window's global tokens) so that the
    gradients after the window are the global per-token mean gradient.

    DDP and FSDP average gradients over processes (times num_processes undoes it), and
    ``Accelerator.backward`` divides every loss by ``gradient_accumulation_steps`` (except under DeepSpeed,
    which this loop does not use): times the steps undoes it, since the window's token count already
    normalizes. tests/test_uptrain.py pins both library behaviours.
    """
    return accelerator.num_processes * accelerator.gradient_accumulation_steps


def run(recipe: Recipe, teacher_only: bool = False) -> TrainingSummary | None:
    """Train as the recipe says; returns the summary (also printed by the CLI).

    The model and teacher paths and the local data files are checked before anything is written; a run that
    fails (or is interrupted) before its first checkpoint removes the output directory it created.
    """
    check_paths(recipe)
    with checkpoints.removed_on_failure(Path(recipe.output_dir)):
        try:
            return _run(recipe, teacher_only)
        except RuntimeError as exc:  # gloo and NCCL report a collective's timeout as a RuntimeError subclass
            if "timed out" not in str(exc).lower():
                raise
            last = checkpoints.newest(Path(recipe.output_dir))
            raise TrainingError(
                f"the processes waited {recipe.train.collective_timeout_s} s in a collective that not all of them "
                "joined (train.collective_timeout_s): one stopped or stalled; "
                + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet")
            ) from None


def check_paths(recipe: Recipe) -> None:
    """The model and teacher checkpoints and the local data files, checked before anything loads or is written."""
    for what, path in (("model", recipe.model), ("teacher", recipe.teacher)):
        if path:
            checkpoints.check_model(path, what)
    check_entries(recipe.data.train + (recipe.data.eval or []))


def _process_state(recipe: Recipe) -> PartialState:
    """accelerate's process state, made first so that the process group gets ``train.collective_timeout_s``: a
    collective that some process never joins stops the run instead of hanging it."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    # A run in a process that ran one before (the demo, a notebook) may take another precision: accelerate's state
    # is process-wide and refuses a change. The process group itself, once made, stays.
    AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(
        cpu=not torch.cuda.is_available(),  # with several processes and no GPU: gloo on CPU
        timeout=timedelta(seconds=recipe.train.collective_timeout_s),
    )


def _accelerator(recipe: Recipe, dtype: torch.dtype) -> Accelerator:
    """The Accelerator of a run: CPU (gloo) without a GPU, the recipe's precision for a ``dtype`` checkpoint,
    exact accumulation windows."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    t = recipe.train
    if recipe.log.tracker != "none":
        try:
            __import__(recipe.log.tracker)  # tensorboard or wandb (validated by the recipe)
        except ImportError:
            raise RecipeError(f"log.tracker {recipe.log.tracker} needs `pip install {recipe.log.tracker}`") from None
    cpu = not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision(t, dtype, "cpu" if cpu else "cuda"),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with=None if recipe.log.tracker == "none" else recipe.log.tracker,
        project_dir=str(recipe.output_dir),
        step_scheduler_with_optimizer=False,
    )


def _data(
    recipe: Recipe, accelerator: Accelerator, model_path: str
) -> tuple[PreTrainedTokenizerBase, HFDataset, HFDataset]:
    """(tokenizer, train blocks, eval blocks): one process tokenizes, the others read its cache."""
    tokenizer = load_tokenizer(model_path)
    with accelerator.main_process_first():
        train_set, eval_set = data.build_datasets(recipe, tokenizer)
    return tokenizer, train_set, eval_set


def _tasks(recipe: Recipe) -> downstream.Tasks | None:
    """The recipe's downstream tasks, checked, or None when it names none."""
    e = recipe.eval
    if not e.tasks:
        return None
    return downstream.load_tasks(
        e.tasks, e.tasks_num_fewshot, downstream.task_limit(e.tasks_limit), recipe.train.micro_batch_size
    )


def _scores(tasks: downstream.Tasks | None, path: str, accelerator: Accelerator) -> dict[str, float]:
    """The tasks on the checkpoint at `path`, on the main process (uptrain.downstream.checkpoint_scores); {}
    without tasks or on the other processes."""
    if tasks is None or not accelerator.is_main_process:
        return {}
    return downstream.checkpoint_scores(tasks, path, accelerator.device)


@dataclass
class _Setup:
    """What the loop runs on, after accelerate's prepare."""

    model: torch.nn.Module  # the student, as accelerate's prepare wrapped it
    teacher: PreTrainedModel | None
    source_dtype: torch.dtype
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    eval_loader: torch.utils.data.DataLoader
    total_steps: int
    tokens_per_step: int
    start_step: int


def _prepare(
    recipe: Recipe, accelerator: Accelerator, model_path: str, eval_set: HFDataset, resume_from: Path | None
) -> _Setup:
    """Models, optimizer, scheduler and eval loader through accelerate's prepare; the tied-weights save hook,
    torch.compile and the resumed state after it."""
    t = recipe.train
    _print_plan(recipe, accelerator, model_path)
    model, teacher, source_dtype, trainable = student.load_models(recipe, accelerator, model_path)
    tokens_per_step, total_steps = schedule(recipe, accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        student.param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=(t.betas[0], t.betas[1]),  # the recipe holds two
        fused=accelerator.device.type in ("cuda", "cpu"),
    )  # one kernel, not a loop
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, recipe, total_steps))
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=data.collate)
    model, optimizer, scheduler, eval_loader = accelerator.prepare(model, optimizer, scheduler, eval_loader)
    accelerator.register_save_state_pre_hook(checkpoints.save_tied_once)
    whole = t.trainable == "all"
    if not whole:
        accelerator.register_save_state_pre_hook(checkpoints.save_trained_only)
    if t.compile:
        student.compile_student(accelerator, model, t.compile_backend)
    start_step = 0
    if resume_from is not None:
        if not whole:  # the checkpoint holds the trained parameters alone: exactly those, checked first
            checkpoints.check_trained_match(resume_from, model)
        accelerator.load_state(str(resume_from), strict=whole)
        start_step = checkpoints.read_state(resume_from)["step"]
    if accelerator.is_main_process:
        print(
            f"uptrain: {model_path} -> {recipe.output_dir}: {total_steps} steps of {tokens_per_step:,} tokens, "
            f"{trainable:,} trainable parameters, {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type.value}) on {accelerator.device.type}, precision "
            f"{accelerator.mixed_precision}" + (f", resuming from {resume_from.name}" if resume_from else "")
        )
    return _Setup(
        model, teacher, source_dtype, optimizer, scheduler, eval_loader, total_steps, tokens_per_step, start_step
    )


def _offline_teacher(
    recipe: Recipe, accelerator: Accelerator, train_set: datasets.Dataset, resume_from: Path | None
) -> teacher_files.TeacherFiles:
    """The offline teacher's files for the blocks this run will train on (``uptrain.teacher``): reused when their
    key matches, else computed by the main process, one layer at a time; the others wait for them on disk. A
    resumed run must have trained on files of the same key (checked before any pass)."""
    t, d = recipe.train, recipe.distill
    _, steps = schedule(recipe, accelerator.num_processes)
    needed = (steps * t.grad_accum + 1) * t.micro_batch_size * accelerator.num_processes  # + DDP's padding
    rows = np.array(data.training_rows(len(train_set), t.micro_batch_size, t.seed, needed), dtype=np.int64)

    def blocks(start: int, stop: int) -> torch.Tensor:
        return torch.stack([torch.as_tensor(train_set[int(i)]["input_ids"]) for i in rows[start:stop]])

    assert recipe.teacher is not None, "distill.weight > 0 needs a teacher: the recipe has one"
    source = resolve_source(recipe.teacher)
    key = teacher_files.teacher_key(source, blocks, rows, d.top_k, d.temperature, d.logits_dtype)
    if resume_from is not None:
        checkpoints.check_teacher_files(resume_from, key)
    directory = Path(recipe.output_dir) / teacher_files.DIRECTORY
    if accelerator.is_main_process and teacher_files.stored_key(directory) != key:
        teacher_files.teacher_pass(
            source,
            blocks,
            rows,
            recipe.data.seq_len,
            d.top_k,
            d.temperature,
            d.logits_dtype,
            directory,
            key,
            pick_device("auto"),
        )
    while teacher_files.stored_key(directory) != key:  # the main process computes them (no collective: it may
        time.sleep(1.0)  # take longer than the collective timeout)
    return teacher_files.TeacherFiles(directory, key)


def _print_plan(recipe: Recipe, accelerator: Accelerator, model_path: str) -> None:
    """The run's memory plan (``uptrain.plan``) in one line, and a warning line where it exceeds the device."""
    from accelerate.utils import DistributedType
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    shape = RunShape(
        accelerator.device.type,
        accelerator.mixed_precision,
        config_dtype(config),
        accelerator.num_processes,
        accelerator.distributed_type == DistributedType.FSDP,
    )
    plan = memory_plan(recipe, config, shape, AutoConfig.from_pretrained(recipe.teacher) if recipe.teacher else None)
    if accelerator.is_main_process:
        print(plan.line(), flush=True)
        if plan.warning():
            print(plan.warning(), file=sys.stderr, flush=True)


def _metrics(recipe: Recipe, accelerator: Accelerator, start_step: int, before: dict[str, float]) -> MetricsLog:
    """The run's metrics.jsonl (and tracker), with the starting model's downstream scores at step 0."""
    out = Path(recipe.output_dir)
    if recipe.log.tracker != "none":
        accelerator.init_trackers(out.name, config=tracker_config(asdict(recipe)))
    metrics = MetricsLog(out / "metrics.jsonl", start_step, accelerator.is_main_process)
    if before:
        metrics.write({"step": 0, "tokens": 0, **before})
        accelerator.log(before, step=0)
    return metrics


def _run(recipe: Recipe, teacher_only: bool = False) -> TrainingSummary | None:
    from accelerate.utils import set_seed

    out = Path(recipe.output_dir)
    t = recipe.train
    tasks = _tasks(recipe)  # before anything runs: a bad task name stops here
    state = _process_state(recipe)
    select_fused_loss(t.fused_loss, state.device.type, biased_distill=False)  # fail before loading anything
    student.check_quantization(t.base_quantization, state)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoints.find_resume(out, recipe.resume)
    model_path = student.model_path(recipe, state)
    student.check_model_settings(recipe, model_path)  # the family's roles and kv split, before any weight loads
    accelerator = _accelerator(recipe, student.checkpoint_dtype(model_path))
    set_seed(t.seed)

    tokenizer, train_set, eval_set = _data(recipe, accelerator, model_path)
    stored: teacher_files.TeacherFiles | None = None
    if recipe.distill.mode == "offline":
        stored = _offline_teacher(recipe, accelerator, train_set, resume_from)
    elif resume_from is not None:
        checkpoints.check_teacher_files(resume_from, None)
    if teacher_only:
        return None
    before = _scores(tasks, model_path, accelerator) if recipe.eval.tasks_before and not resume_from else {}
    s = _prepare(recipe, accelerator, model_path, eval_set, resume_from)
    metrics = _metrics(recipe, accelerator, s.start_step, before)

    loop = _Loop(
        recipe,
        accelerator,
        s.model,
        s.teacher,
        s.optimizer,
        s.scheduler,
        s.eval_loader,
        metrics,
        s.total_steps,
        s.tokens_per_step,
        stored,
    )
    batches = data.train_batches(train_set, t.micro_batch_size, t.seed, accelerator, start=s.start_step * t.grad_accum)
    summary = loop.train(batches, s.start_step)

    final = out / "final"
    _save_final(recipe, accelerator, s, tokenizer, model_path)
    after = _scores(tasks, str(final), accelerator)  # main process only; the others end meanwhile
    if after:
        metrics.write({"step": summary.steps, "tokens": summary.tokens, **after})
        accelerator.log(after, step=summary.steps)
        summary.downstream_before, summary.downstream = before, after
    accelerator.end_training()
    if accelerator.is_main_process:
        plot_metrics(metrics.read(), out / "training.png", recipe.data.seq_len)
        summary.final, summary.plot = str(final), str(out / "training.png")
    return summary


def _save_final(
    recipe: Recipe, accelerator: Accelerator, s: _Setup, tokenizer: PreTrainedTokenizerBase, model_path: str
) -> None:
    """OUTPUT_DIR/final; with adapters also OUTPUT_DIR/final-adapter, and final is the base checkpoint with them
    merged tensor by tensor (``uptrain.merge``), never the (possibly quantized) weights in memory."""
    out = Path(recipe.output_dir)
    if recipe.lora is None:
        checkpoints.save_final(accelerator, s.model, tokenizer, model_path, out / "final", s.source_dtype)
        return
    merge.save_adapter(accelerator, s.model, out / "final-adapter")
    if accelerator.is_main_process:
        merge.merge(out / "final-adapter", resolve_source(model_path), out / "final")
    accelerator.wait_for_everyone()


class _Loop:
    """The optimizer-step loop with its logging, evaluation and checkpoints."""

    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        model: torch.nn.Module,
        teacher: PreTrainedModel | None,
        optimizer: AcceleratedOptimizer,
        scheduler: AcceleratedScheduler,
        eval_loader: torch.utils.data.DataLoader,
        metrics: MetricsLog,
        total_steps: int,
        tokens_per_step: int,
        stored: teacher_files.TeacherFiles | None = None,
    ) -> None:
        self.r, self.acc, self.model, self.teacher, self.stored = recipe, accelerator, model, teacher, stored
        self.optimizer, self.scheduler, self.eval_loader, self.metrics = optimizer, scheduler, eval_loader, metrics
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.step, self.grad_norm = 0, float("nan")
        self.lines, self.interval_start, self.interval_tokens = False, 0.0, 0  # set by train()
        self.chunk = loss_chunk(recipe.train.loss_chunk_tokens, accelerator, model, teacher)
        heads = [accelerator.unwrap_model(model)] + ([teacher] if teacher is not None else [])
        biased = teacher is not None and any(m.get_output_embeddings().bias is not None for m in heads)
        self.fused = select_fused_loss(
            recipe.train.fused_loss, accelerator.device.type, biased, offline=stored is not None
        )

    def window_loss(self, window: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over one accumulation window; returns the window's (loss, CE) sums per token."""
        acc, r = self.acc, self.r
        tokens = torch.tensor(
            sum(b["input_ids"][:, 1:].numel() for b in window), device=acc.device, dtype=torch.float64
        )
        tokens = acc.reduce(tokens, "sum")
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        ce_total = torch.zeros_like(total)
        window_loss = None  # set at the sync, which the window's last micro-batch always is
        for batch in window:
            with acc.accumulate(self.model):
                loss, ce = self.micro_batch_loss(batch)
                acc.backward(loss * backward_scale(acc) / tokens.float())
                total += loss.detach().double()
                ce_total += ce.detach().double()
                if acc.sync_gradients:  # the window's last micro-batch: total is complete
                    window_loss = acc.reduce(total.clone(), "sum") / tokens
                    self.check_finite(window_loss)
                    self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), r.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        assert window_loss is not None, "the window's last micro-batch syncs"
        return window_loss, acc.reduce(ce_total, "sum") / tokens

    def micro_batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, CE) sums of one micro-batch: chunked from hidden states (uptrain.loss) where exact, else full;
        distilled from the teacher beside the student, or from its stored distribution (offline)."""
        r, acc, w, ids = self.r, self.acc, self.r.distill.weight, batch["input_ids"]
        if self.stored is not None:
            return self.offline_loss(ids, self.stored.targets(batch["index"], ids.device))
        if self.chunk:
            hidden = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            teacher_hidden = self.teacher_hidden(ids) if w > 0 else None
            head = acc.unwrap_model(self.model).get_output_embeddings()
            teacher_head = None if w == 0 else self.online_teacher.get_output_embeddings()
            if self.fused == "liger":
                return liger_loss(hidden, head, ids, teacher_hidden, teacher_head, w, r.distill.temperature)
            return chunked_loss(hidden, head, ids, teacher_hidden, teacher_head, w, r.distill.temperature, self.chunk)
        logits = self.model(input_ids=ids).logits
        ce = token_losses(logits, ids)
        if w == 0:
            return ce, ce.detach()
        # Not copied out of inference mode: (B, T, vocab); distill_kl only reads it, never saves it for backward.
        teacher_logits = self.teacher_output(ids).logits
        assert teacher_logits is not None, "a causal LM's forward returns logits"
        return (1 - w) * ce + w * distill_kl(logits, teacher_logits, r.distill.temperature), ce.detach()

    def offline_loss(self, ids: torch.Tensor, stored: Stored) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, CE) sums against the offline teacher's stored distribution, chunked or from full logits."""
        w, temperature = self.r.distill.weight, self.r.distill.temperature
        if self.chunk:
            hidden = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            head = self.acc.unwrap_model(self.model).get_output_embeddings()
            return chunked_loss(hidden, head, ids, weight=w, temperature=temperature, chunk=self.chunk, stored=stored)
        logits = self.model(input_ids=ids).logits
        ce = token_losses(logits, ids)
        return (1 - w) * ce + w * stored_distill_kl(logits, stored, temperature), ce.detach()

    @property
    def online_teacher(self) -> PreTrainedModel:
        """The teacher beside the student: there whenever the run distils online (distill.weight > 0)."""
        assert self.teacher is not None, "online distillation loads its teacher"
        return self.teacher

    def teacher_output(self, ids: torch.Tensor, **kwargs: Any) -> CausalLMOutputWithPast:
        """The teacher's forward in the compute dtype, under no_grad, or inference_mode where the recipe says
        (distill.teacher_inference_mode: no version counters or autograd metadata on its tensors)."""
        no_grad = torch.inference_mode() if self.r.distill.teacher_inference_mode else torch.no_grad()
        with no_grad, self.acc.autocast():
            return self.online_teacher(input_ids=ids, **kwargs)

    def teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states (B, T, H) for the chunked loss, usable by autograd."""
        states = self.teacher_output(ids, output_hidden_states=True, logits_to_keep=1).hidden_states
        assert states is not None, "asked for with output_hidden_states"
        # A cheap copy out of inference mode (distill.teacher_inference_mode), for autograd.
        return states[-1].clone() if states[-1].is_inference() else states[-1]

    def save(self) -> None:
        """A checkpoint of this step; a full or read-only disk stops the run naming the last complete one."""
        out = Path(self.r.output_dir)
        try:
            facts = {} if self.stored is None else {"teacher": self.stored.key}
            checkpoints.save(self.acc, out, self.step, self.r.save.keep_last, facts)
        except OSError as exc:
            last = checkpoints.newest(out)
            keep = (
                f"the last complete checkpoint, {last}, is intact: rerun to resume from it"
                if last
                else "no complete checkpoint was written yet"
            )
            raise TrainingError(
                f"saving the step-{self.step} checkpoint failed ({os_error_line(exc).removeprefix('error: ')}); {keep}"
            ) from None

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run before the update when the window's loss is not finite, naming the last good checkpoint."""
        if not torch.isfinite(loss):
            last = checkpoints.newest(Path(self.r.output_dir))
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"the loss became {loss.item()} at step {self.step + 1}; stopped before the update; "
                f"{keep}. Lower train.lr or check the data"
            )

    def log(self, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl and the tracker."""
        self.metrics.write(record)
        self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def eval_now(self) -> dict[str, float]:
        """The in-loop eval at this step, logged (and printed by the main process)."""
        result = eval_metrics(self.model, self.eval_loader, self.acc)
        self.log({"step": self.step, "tokens": self.step * self.tokens_per_step, **result})
        if self.acc.is_main_process:
            tqdm.write(
                f"step {self.step}: eval perplexity {result['eval_ppl']:.2f} (loss {result['eval_loss']:.4f}) "
                f"on {result['eval_tokens']:,} tokens in {self.r.data.seq_len}-token blocks",
                file=sys.stdout,
            )
        return result

    def train(self, batches: Iterator[dict[str, torch.Tensor]], start_step: int) -> TrainingSummary:
        """Optimizer steps from ``start_step`` to the last, with the in-loop evals, logs and checkpoints."""
        acc = self.acc
        self.step = start_step
        first_eval = self.logged_eval(first=True)
        if self.step == 0 or first_eval is None:
            first_eval = self.eval_now()
        self.model.train()
        self.lines = acc.is_main_process and not sys.stderr.isatty()  # logs get a line per log step, terminals a bar
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not acc.is_main_process or self.lines,
            desc="uptrain",
            unit="step",
        )
        started = self.interval_start = time.perf_counter()
        self.interval_tokens, last_eval, trained_tokens = 0, None, 0
        try:
            while self.step < self.total_steps:
                loss, ce = self.window_loss([next(batches) for _ in range(self.r.train.grad_accum)])
                self.scheduler.step()
                self.step += 1
                trained_tokens += self.tokens_per_step
                self.interval_tokens += self.tokens_per_step
                last_eval = self.after_step(loss, ce, bar) or last_eval
                bar.update(1)
        except torch.OutOfMemoryError:
            t = self.r.train
            raise TrainingError(
                f"out of GPU memory at train.micro_batch_size={t.micro_batch_size}, data.seq_len="
                f"{self.r.data.seq_len}: lower train.micro_batch_size (raise train.grad_accum to keep the batch), "
                "set train.gradient_checkpointing=true, or shorten data.seq_len"
            ) from None
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        if last_eval is None:  # resumed a run that had already finished: its last eval is in the log
            last_eval = self.logged_eval(first=False) or first_eval
        return TrainingSummary(
            eval_ppl_before=first_eval["eval_ppl"],
            eval_ppl_after=last_eval["eval_ppl"],
            steps=self.step,
            tokens=self.step * self.tokens_per_step,
            seconds=seconds,
            tokens_per_s=trained_tokens / seconds if seconds else 0.0,
        )

    def logged_eval(self, first: bool) -> dict[str, Any] | None:
        """The first (or last) eval record of metrics.jsonl as the main process reads it, sent to every process: the
        main process rewrites the file when resuming, so the others must not decide from their own reading
        whether to run an eval, a collective."""
        from accelerate.utils import broadcast_object_list

        found: list[dict[str, Any] | None] = [None]
        if self.acc.is_main_process:
            evals = [m for m in self.metrics.read() if "eval_ppl" in m]
            found = [(evals[0] if first else evals[-1]) if evals else None]
        if self.acc.num_processes > 1:
            broadcast_object_list(found)
        return found[0]

    def after_step(self, loss: torch.Tensor, ce: torch.Tensor, bar: tqdm[NoReturn]) -> dict[str, float] | None:
        """Log, evaluate and save where the recipe's intervals (and the last step) say; the eval's result, if any."""
        r, last = self.r, self.step == self.total_steps
        if self.step % r.log.every_steps == 0 or last:
            self.log_step(loss, ce, bar)
        result = None
        if self.step % r.eval.every_steps == 0 or last:
            result = self.eval_now()
            self.model.train()
        if self.step % r.save.every_steps == 0 or last:
            self.save()
        return result

    def log_step(self, loss: torch.Tensor, ce: torch.Tensor, bar: tqdm[NoReturn]) -> None:
        """One metrics record: loss, CE, learning rate, gradient norm and tokens/s since the last record."""
        now = time.perf_counter()
        record = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "loss": loss.item(),
            "ce": ce.item(),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": self.interval_tokens / (now - self.interval_start),
        }
        self.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if self.lines:
            print(
                f"step {self.step}/{self.total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"{record['tokens_per_s']:,.0f} tokens/s",
                flush=True,
            )
        self.interval_start, self.interval_tokens = now, 0
