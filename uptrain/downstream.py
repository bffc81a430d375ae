"""Downstream tasks through EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

A task is one of lm-eval's own names (``hellaswag``, ``arc_easy``, ...: their data comes from the hub) or the
path of a task YAML file (local data through ``dataset_path: json``), so offline users and the tests run
local tasks. Scoring is lm-eval's own: this module only checks the tasks, runs ``lm_eval.simple_evaluate``
on a model already loaded (``HFLM(pretrained=model)``) and picks each task's main metric: the first of its
``metric_list`` (lm-eval's default for multiple choice: ``acc``), with its standard error.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvshrink_base.errors import first_line
from kvshrink_base.models import load_model_and_tokenizer
from uptrain.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL = 'pip install -e ".[eval]"'


@dataclass(frozen=True)
class Score:
    """A task's main metric on one model."""

    metric: str  # e.g. "acc"
    value: float
    stderr: float | None  # None where lm-eval gives none
    samples: int  # documents scored


@dataclass
class Tasks:
    """Checked tasks, ready to run on any number of models with the same settings."""

    specs: list[str]  # what simple_evaluate loads: registered names, or YAML files' absolute paths
    names: list[str]  # the task (or group) name each spec reports under
    manager: TaskManager  # the lm_eval TaskManager that knows them
    num_fewshot: int | None = None  # None: each task's own default
    limit: float | None = None  # documents per task (a fraction when below 1); None: all
    batch_size: int = 8


def require_lm_eval() -> None:
    """Refuse, in one line naming the pip command, when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"downstream tasks need lm-evaluation-harness (lm-eval); run: {INSTALL}")


def quiet() -> None:
    """lm-eval logs every step at INFO and warns about things we do on purpose (a loaded model object); datasets
    draws a bar for every local file it reads."""
    import datasets

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()


def task_limit(limit: float | None) -> float | int | None:
    """``--limit`` / ``eval.tasks_limit`` as lm-eval takes it: a document count from 1 up, a fraction below."""
    return None if limit is None else (int(limit) if limit >= 1 else limit)


def is_task_file(spec: str) -> bool:
    """Whether a task spec names a task YAML file rather than one of lm-eval's task names."""
    return spec.endswith((".yaml", ".yml")) or Path(spec).exists()


def load_tasks(
    specs: list[str], num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8
) -> Tasks:
    """Check every task before any model is loaded: files exist, names are registered, data loads.

    Raises RecipeError (one line) for a missing file, an unknown name, or a task whose data cannot be read
    (a hub task offline, a YAML naming a missing data file).
    """
    require_lm_eval()
    quiet()
    from lm_eval.tasks import TaskManager

    for spec in specs:
        if is_task_file(spec) and not Path(spec).is_file():
            raise RecipeError(f"task file {spec} does not exist")
    names_only = [s for s in specs if not is_task_file(s)]
    # Indexing lm-eval's own ~15,000 task files takes seconds: only when a task is named.
    manager = TaskManager(include_defaults=bool(names_only))
    for name in names_only:
        if name not in manager.all_tasks:
            raise RecipeError(
                f"unknown task {name!r}: not one of lm-eval's tasks (list them with `lm-eval ls "
                "tasks`) nor a task YAML file"
            )
    resolved = [str(Path(s).resolve()) if is_task_file(s) else s for s in specs]
    names = [_load_one(manager, spec) for spec in resolved]
    return Tasks(resolved, names, manager, num_fewshot, limit, batch_size)


def _load_one(manager: TaskManager, spec: str) -> str:
    """Build a task once (reading its data) and return the name it reports under."""
    try:
        loaded = manager.load([spec])
    except Exception as exc:  # lm-eval and datasets raise many types for a bad task or data
        first = first_line(exc)
        raise RecipeError(f"task {spec} cannot be loaded: {first}") from None
    groups = [g for g in loaded["groups"] if g not in {c for cs in loaded["group_map"].values() for c in cs}]
    if len(groups) == 1:
        return groups[0]
    if len(loaded["tasks"]) != 1:
        raise RecipeError(f"task {spec} is a tag of {len(loaded['tasks'])} tasks; name them one by one")
    return next(iter(loaded["tasks"]))


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Tasks) -> dict[str, Score]:
    """Run the tasks on a loaded transformers model; returns {task name: its main metric}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    quiet()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=tasks.batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks.specs),
        num_fewshot=tasks.num_fewshot,
        limit=tasks.limit,
        task_manager=tasks.manager,
        log_samples=False,
    )
    return {name: main_score(results, name) for name in tasks.names}


def main_score(results: dict[str, Any], name: str) -> Score:
    """The main metric of task (or group) `name` in simple_evaluate's results: the first of its metric_list."""
    entry = results.get("groups", {}).get(name) or results["results"][name]
    config = results.get("configs", {}).get(name, {})
    preferred = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    keys = [k for k in entry if "," in k and "_stderr," not in k and isinstance(entry[k], (int, float))]
    if not keys:
        raise RecipeError(f"task {name} reported no metric")
    key = next((k for p in preferred for k in keys if k.split(",")[0] == p), keys[0])
    metric, filt = key.split(",", 1)
    stderr = entry.get(f"{metric}_stderr,{filt}")
    samples = results.get("n-samples", {}).get(name, {}).get("effective", 0)
    return Score(
        metric,
        float(entry[key]),
        float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        samples,
    )


def checkpoint_scores(tasks: Tasks, path: str, device: torch.device) -> dict[str, float]:
    """The tasks on the checkpoint at ``path`` (loaded onto ``device``) as flat metrics
    ``downstream/TASK/METRIC`` and ``..._stderr``, also printed on one line: the uptrainer's before/after scores."""
    model, tokenizer = load_model_and_tokenizer(path, device=device)
    flat = {}
    for name, score in evaluate(model, tokenizer, tasks).items():
        flat[f"downstream/{name}/{score.metric}"] = score.value
        if score.stderr is not None:
            flat[f"downstream/{name}/{score.metric}_stderr"] = score.stderr
    print(
        "downstream "
        + ", ".join(f"{k.removeprefix('downstream/')} {v:.4f}" for k, v in flat.items() if not k.endswith("_stderr")),
        flush=True,
    )
    return flat
