"""Uptraining recipes: YAML files validated into dataclasses, with dotted ``key=value`` overrides.

Every key is checked: an unknown or mistyped one is an error that lists the valid
keys of its section, and every value must have the declared type. ``schedule`` and ``lr_at`` turn a recipe into
its optimizer steps and learning rate per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from convert.errors import ConversionError
from convert.merge import GROUPINGS, METHODS
from convert.options import CALIBRATION_ORDERS, DTYPES, ConvertOptions
from convert.roles import SUBSETS
from kvshrink_base.errors import first_line
from uptrain.errors import RecipeError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["LORA_ROLES", "Recipe", "RecipeError", "load_recipe", "lr_at", "schedule"]

LORA_ROLES = ("q", "k", "v", "o", "qkv")  # a fused family's q, k and v are its one qkv module

_Section = TypeVar("_Section", bound="DataclassInstance")  # a recipe dataclass that ``_build`` fills


@dataclass(kw_only=True)
class ConvertStep(ConvertOptions):
    """Convert ``source`` first (into OUTPUT_DIR/converted, with the converter's options and names) and train it.

    ``calibration_data`` defaults to the recipe's ``data.train`` files when the method needs calibration text,
    or, when those are no local files (a hub stream), to ``calibration_tokens`` sampled from ``source``.
    """

    source: str


@dataclass
class Data:
    train: list[str]
    eval: list[str] | None = None
    eval_fraction: float = 0.01
    text_field: str = "text"
    seq_len: int = 1024
    streaming: bool = False
    hub_config: str | None = None  # for a datasets hub name: its config
    hub_split: str = "train"  # ... and split


@dataclass
class Train:
    max_steps: int | None = 1000
    max_tokens: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 8
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    trainable: str = "all"  # all | attention | kv | none (with a lora section: the adapters alone)
    base_quantization: str = "none"  # none | 4bit | 8bit: the frozen base through bitsandbytes (needs lora)
    loss_chunk_tokens: int = 512
    fused_loss: str = "auto"  # auto | liger | off (uptrain.loss.select_fused_loss)
    compile: bool = False  # torch.compile the student in place (uptrain.student.compile_student)
    compile_backend: str = "inductor"
    seed: int = 0
    collective_timeout_s: int = 900  # how long a process waits in a collective before the run stops


@dataclass
class Lora:
    """Low-rank adapters (peft's LoRA) on the modules of the named roles (``uptrain.adapters``)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])


@dataclass
class Distill:
    weight: float = 0.0
    temperature: float = 1.0
    teacher_inference_mode: bool = False  # the teacher's forward under torch.inference_mode, not no_grad
    mode: str = "online"  # online: the teacher beside the student; offline: its top-k log-probs, computed first
    top_k: int | None = 64  # offline: tokens kept per position (null: the whole vocabulary)
    logits_dtype: str = "bfloat16"  # offline: how the stored log-probs are kept


@dataclass
class Eval:
    every_steps: int = 200
    max_tokens: int = 200_000
    tasks: list[str] = field(default_factory=list)  # downstream tasks (lm-eval names, task YAMLs) on the final model
    tasks_before: bool = False  # ... and on the starting model
    tasks_limit: float | None = None  # documents per task (a fraction below 1); None: all
    tasks_num_fewshot: int | None = None  # None: each task's default


@dataclass
class Save:
    every_steps: int = 500
    keep_last: int = 2


@dataclass
class Log:
    every_steps: int = 10
    tracker: str = "none"


@dataclass
class Recipe:
    output_dir: str
    data: Data
    model: str | None = None
    convert: ConvertStep | None = None
    teacher: str | None = None
    resume: str = "auto"
    train: Train = field(default_factory=Train)
    lora: Lora | None = None
    distill: Distill = field(default_factory=Distill)
    eval: Eval = field(default_factory=Eval)
    save: Save = field(default_factory=Save)
    log: Log = field(default_factory=Log)


CHOICES = {
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.trainable": ("all", "attention", "kv", "none"),
    "train.base_quantization": ("none", "4bit", "8bit"),
    "train.fused_loss": ("auto", "liger", "off"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "log.tracker": ("none", "tensorboard", "wandb"),
    "distill.mode": ("online", "offline"),
    "distill.logits_dtype": ("bfloat16", "float32"),
    "convert.method": tuple(METHODS),
    "convert.grouping": tuple(GROUPINGS),
    "convert.dtype": tuple(DTYPES),
    "convert.calibration_order": CALIBRATION_ORDERS,
}


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Check (and lightly coerce: int -> float) a YAML value against a dataclass field type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_type(value, option, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0])
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, value, where)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type[_Section], raw: Any, where: str) -> _Section:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(
            f"unknown recipe key {prefix}{unknown[0]}; valid keys{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            values[name] = _check_type(raw[name], hints[name], key)
            if key in CHOICES and values[name] not in CHOICES[key]:
                raise RecipeError(f"{key}: {values[name]!r} is not one of {', '.join(CHOICES[key])}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"recipe needs {key}")
    return cls(**values)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings; values are parsed as YAML (``train.lr=2e-4``).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {first_line(exc)}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not key=value (for example train.lr=2e-4)")
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    recipe = _build(Recipe, raw, "")
    _expand_paths(recipe)
    _check_consistency(recipe)
    return recipe


def _check_convert(c: ConvertStep, train: list[str]) -> None:
    """The convert step's options, checked as the converter checks them (calibration text defaults to
    ``train``, the recipe's data.train)."""
    default = train if METHODS[c.method].calibrated and not c.calibration_data else c.calibration_data
    try:
        dataclasses.replace(c, calibration_data=default).validate()
    except ConversionError as exc:
        raise RecipeError(f"convert: {exc}") from None


PATH_FIELDS = (
    "model",
    "teacher",
    "output_dir",
    "resume",
    "convert.source",
    "convert.calibration_data",
    "data.train",
    "data.eval",
)
_NAME = re.compile(r"[A-Za-z_]\w*")


def expand_path(text: str, where: str) -> str:
    """``~``, ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` (defaults may nest) expanded as a shell would.

    Raises:
        RecipeError: a variable without a default that is not set, or an unclosed ``${``.
    """
    value, _ = _expand(text, 0, where, in_default=False, used=True)
    return os.path.expanduser(value)


def _expand(text: str, i: int, where: str, in_default: bool, used: bool) -> tuple[str, int]:
    """text[i:] expanded up to its end, or up to the ``}`` that closes a default; returns (value, end).
    An unused default is only scanned (an unset variable there is no error, as in a shell)."""
    out = []
    while i < len(text) and not (in_default and text[i] == "}"):
        braced = text.startswith("${", i)
        name = _NAME.match(text, i + 1 + braced) if text[i] == "$" else None
        if name is None:
            out.append(text[i])
            i += 1
            continue
        i, default = name.end(), None
        if braced:
            if text.startswith(":-", i):
                default, i = _expand(text, i + 2, where, True, used and not os.environ.get(name[0]))
            if not text.startswith("}", i):
                raise RecipeError(f"{where}: unclosed ${{ in {text!r}")
            i += 1
        if default is not None:
            out.append(os.environ.get(name[0]) or default)
        elif name[0] in os.environ:
            out.append(os.environ[name[0]])
        elif used:
            raise RecipeError(f"{where}: ${name[0]} in {text!r} is not set; set it or write the path out")
    return "".join(out), i


def _expand_paths(recipe: Recipe) -> None:
    """Expand every path field of the recipe in place (PATH_FIELDS)."""
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        node = recipe
        for part in parents:
            node = getattr(node, part)
        value = None if node is None else getattr(node, leaf)
        if isinstance(value, str):
            setattr(node, leaf, expand_path(value, dotted))
        elif isinstance(value, list):
            setattr(node, leaf, [expand_path(v, f"{dotted}[{k}]") for k, v in enumerate(value)])


def schedule(recipe: Recipe, processes: int = 1) -> tuple[int, int]:
    """(tokens per optimizer step, optimizer steps) of a run on ``processes`` processes: ``train.max_steps``, or
    as many steps as ``train.max_tokens`` needs."""
    t = recipe.train
    tokens_per_step = t.micro_batch_size * t.grad_accum * recipe.data.seq_len * processes
    if t.max_steps is not None:
        return tokens_per_step, t.max_steps
    assert t.max_tokens is not None, "a loaded recipe sets exactly one of train.max_steps and train.max_tokens"
    return tokens_per_step, math.ceil(t.max_tokens / tokens_per_step)


def lr_at(step: int, recipe: Recipe, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine down to train.min_lr at the last step (a multiplier of lr)."""
    t = recipe.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_consistency(r: Recipe) -> None:
    if (r.model is None) == (r.convert is None):
        raise RecipeError("recipe needs exactly one of model (a converted checkpoint) or convert {source, kv_heads}")
    if r.convert is not None:
        _check_convert(r.convert, r.data.train)
    t = r.train
    if (t.max_steps is None) == (t.max_tokens is None):
        raise RecipeError("set exactly one of train.max_steps or train.max_tokens (the other to null)")
    positive = {
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum": t.grad_accum,
        "data.seq_len": r.data.seq_len,
        "eval.every_steps": r.eval.every_steps,
        "save.every_steps": r.save.every_steps,
        "save.keep_last": r.save.keep_last,
        "log.every_steps": r.log.every_steps,
        "train.max_steps": 1 if t.max_steps is None else t.max_steps,  # None: the other one counts the run
        "train.max_tokens": 1 if t.max_tokens is None else t.max_tokens,
        "train.lr": t.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"{key} must be positive, got {value}")
    if not 0 <= r.distill.weight <= 1:
        raise RecipeError(f"distill.weight must be in [0, 1], got {r.distill.weight}")
    if t.loss_chunk_tokens < 0:
        raise RecipeError(f"train.loss_chunk_tokens must be 0 (full logits) or positive, got {t.loss_chunk_tokens}")
    if r.distill.weight > 0 and r.teacher is None:
        raise RecipeError("distill.weight > 0 needs a teacher model")
    if r.distill.temperature <= 0:
        raise RecipeError("distill.temperature must be positive")
    _check_offline(r)
    if not 0 < r.data.eval_fraction < 1 and r.data.eval is None:
        raise RecipeError("data.eval_fraction must be in (0, 1) when data.eval is not given")
    if t.min_lr > t.lr:
        raise RecipeError(f"train.min_lr {t.min_lr} is above train.lr {t.lr}")
    if len(t.betas) != 2:
        raise RecipeError(f"train.betas must be two numbers (AdamW's beta1 and beta2), got {t.betas}")
    if not r.data.train:
        raise RecipeError("data.train lists no files")
    _check_lora(r)
    if t.collective_timeout_s <= 0:
        raise RecipeError(f"train.collective_timeout_s must be positive, got {t.collective_timeout_s}")
    if r.eval.tasks_limit is not None and r.eval.tasks_limit <= 0:
        raise RecipeError(f"eval.tasks_limit must be positive, got {r.eval.tasks_limit}")
    if r.eval.tasks_num_fewshot is not None and r.eval.tasks_num_fewshot < 0:
        raise RecipeError(f"eval.tasks_num_fewshot must be 0 or more, got {r.eval.tasks_num_fewshot}")


def _check_lora(r: Recipe) -> None:
    """The lora section against itself and ``train``; the family's own roles are checked when the model is known
    (``uptrain.adapters.target_modules``)."""
    t, lora = r.train, r.lora
    if lora is None:
        if t.trainable == "none":
            raise RecipeError("train.trainable: none trains nothing without a lora section")
        if t.base_quantization != "none":
            raise RecipeError(
                f"train.base_quantization: {t.base_quantization} needs a lora section (a quantized "
                "weight cannot be trained fully)"
            )
        return
    if lora.r <= 0:
        raise RecipeError(f"lora.r must be positive, got {lora.r}")
    if lora.alpha <= 0:
        raise RecipeError(f"lora.alpha must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.targets:
        raise RecipeError(f"lora.targets names no role; use some of {', '.join(LORA_ROLES)}")
    unknown = [role for role in lora.targets if role not in LORA_ROLES]
    if unknown:
        raise RecipeError(f"lora.targets: {unknown[0]!r} is not a role; the roles are {', '.join(LORA_ROLES)}")
    if t.trainable == "all":
        raise RecipeError(
            "lora needs train.trainable none or kv: all trains every weight fully, so adapters would add nothing"
        )
    full = set(SUBSETS[t.trainable]) if t.trainable != "none" else set()
    both = [role for role in lora.targets if role in full]
    if both:
        raise RecipeError(
            f"lora.targets: {both[0]} is also trained fully by train.trainable: {t.trainable}; "
            "adapt it or train it, not both"
        )
    if t.base_quantization != "none" and t.trainable != "none":
        raise RecipeError(
            f"train.base_quantization: {t.base_quantization} needs train.trainable: none (the "
            "quantized base cannot be trained fully)"
        )


def _check_offline(r: Recipe) -> None:
    d = r.distill
    if d.mode != "offline":
        return
    if d.top_k is not None and d.top_k <= 0:
        raise RecipeError(f"distill.top_k must be positive (or null: the whole vocabulary), got {d.top_k}")
    if d.weight == 0:
        raise RecipeError("distill.mode: offline needs distill.weight > 0 (nothing distills at weight 0)")
    if r.data.streaming:
        raise RecipeError("distill.mode: offline needs data.streaming: false (the teacher pass indexes the blocks)")
