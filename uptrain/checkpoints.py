"""Training checkpoints (accelerate state, written atomically) and the final Hugging Face checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.source import check_checkpoint
from kvshrink_base.atomic import AtomicDirectory
from uptrain.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

_STEP = re.compile(r"step-(\d+)")
STATE = "trainer_state.json"


def _complete(out: Path) -> list[Path]:
    """Checkpoints that finished writing (a killed save leaves only a .tmp-step-N directory)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))  # step-N, as _STEP matched


def newest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    done = _complete(out)
    return done[-1] if done else None


def find_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint to continue from: `auto` (newest, if any), `never`, or a path."""
    if resume == "auto":
        return newest(out)
    if resume == "never":
        if _complete(out):
            raise RecipeError(
                f"{out} already has checkpoints and resume is never; use resume: auto or a new output_dir"
            )
        return None
    path = Path(resume)
    if not (path / STATE).exists():
        raise RecipeError(f"resume: {resume} is not a complete checkpoint (no {STATE})")
    return path


def check_model(path: str, what: str = "") -> None:
    """Refuse a model path that does not exist, is not a Hugging Face checkpoint, or has truncated or corrupt
    weights (convert's checks: convert.source.check_checkpoint), before anything loads it. A hub id passes
    when the hub can be asked or the offline cache holds it."""
    try:
        directory = check_checkpoint(path)
    except ConversionError as exc:
        raise RecipeError(f"{what} {exc}".strip()) from None
    if directory is None:
        from huggingface_hub import constants, try_to_load_from_cache

        try:
            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except ValueError:  # not a valid repo id either
            cached = False
        if constants.HF_HUB_OFFLINE and not cached:
            raise RecipeError(
                f"{what} {path}: no such directory (nor a hub model in the cache; HF_HUB_OFFLINE is set)".strip()
            )


def check_teacher_files(checkpoint: Path, key: str | None) -> None:
    """Refuse to resume a run distilled from offline teacher files of another key (other data, k, temperature
    or teacher) than this run's: its steps so far learned another target."""
    saved = read_state(checkpoint).get("teacher")
    if saved != key:
        raise RecipeError(
            f"resume: {checkpoint} was trained against other teacher files than this recipe makes "
            f"({'offline distillation' if saved else 'no offline teacher'} then); resume with the "
            "recipe that wrote it, or use a new output_dir"
        )


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: its step (and, distilled offline, its teacher files' key)."""
    return json.loads((path / STATE).read_text())


@contextlib.contextmanager
def removed_on_failure(out: Path) -> Iterator[None]:
    """Remove what this run created for ``out`` (its first missing ancestor) if the body fails or is interrupted
    before a complete checkpoint exists; a directory that existed before is never touched."""
    chain = [*reversed(out.absolute().parents), out.absolute()]
    created = next((p for p in chain if not p.exists()), None)
    try:
        yield
    except BaseException:
        main = os.environ.get("RANK", "0") == "0"  # accelerate launch sets RANK; only process 0 removes
        if created is not None and created.exists() and newest(out) is None and main:
            shutil.rmtree(created, ignore_errors=True)
        raise


def save_tied_once(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate ``save_state`` pre-hook: tied tensors (a tied ``lm_head.weight`` is the embedding) are saved
    once, under their first name, as safetensors requires. ``weights`` are the models' state dicts: tensors, and
    whatever extra state a module keeps.

    accelerate would drop the same names itself, but with a warning on every save; its ``load_state``
    (safetensors ``load_model``) accepts the missing alias and the tie, a shared Parameter, is untouched.
    """
    from accelerate.utils import id_tensor_storage

    for state in weights:
        seen: set[tuple[torch.device, int, int]] = set()
        for name in list(state):
            tensor = state[name]
            if not hasattr(tensor, "untyped_storage"):
                continue
            storage = id_tensor_storage(tensor)
            if storage in seen:
                del state[name]
            seen.add(storage)


def trained_names(model: torch.nn.Module) -> set[str]:
    """The names of the parameters that train (``requires_grad``)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def save_trained_only(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate ``save_state`` pre-hook for runs that train a subset or adapters: each model's state keeps its
    trained parameters alone, never the frozen base (which the run reloads from its checkpoint)."""
    for model, state in zip(models, weights):
        trained = trained_names(model)
        for name in list(state):
            if name not in trained:
                del state[name]


def check_trained_match(checkpoint: Path, model: torch.nn.Module) -> None:
    """Refuse to resume from a checkpoint whose saved parameters are not exactly the ones this run trains (another
    lora section or train.trainable), before anything loads."""
    from safetensors import safe_open

    path = checkpoint / "model.safetensors"
    if not path.exists():
        return  # another format (FSDP's sharded state): accelerate's own loading checks it
    with safe_open(str(path), "pt") as fh:
        saved = {name.removeprefix("module.") for name in fh.keys()}  # DDP's wrapper, at save or now
    trained = {name.removeprefix("module.") for name in trained_names(model)}
    if saved != trained:
        odd = sorted(saved ^ trained)[0]
        raise RecipeError(
            f"resume: {checkpoint} trained other parameters than this recipe does (e.g. {odd}); "
            "resume with the recipe that wrote it, or use a new output_dir"
        )


def save(accelerator: Accelerator, out: Path, step: int, keep_last: int, facts: dict[str, str] | None = None) -> Path:
    """accelerator.save_state into checkpoints/step-N via a temporary name, then keep the newest keep_last.

    Every process writes its part of the state into the same temporary directory between barriers, and process
    0 renames it: a collective write that ``kvshrink_base.atomic.AtomicDirectory`` (one writer) does not cover.
    """
    root = out / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps({"step": step, **(facts or {})}) + "\n")
    except OSError:  # full or read-only disk: drop the partial copy, keep every complete checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in _complete(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    final: Path,
    dtype: torch.dtype,
) -> None:
    """OUTPUT_DIR/final: safetensors in the student's original dtype, its own config.json, the tokenizer.

    The config is the source checkpoint's file, not a re-serialization through transformers (which can
    rewrite keys such as rope_theta for newer readers only).
    """
    state = accelerator.get_state_dict(model)  # gathered from every process (FSDP included)
    if accelerator.is_main_process:
        with AtomicDirectory(final, temp_name=f".tmp-{final.name}") as tmp:
            unwrapped = accelerator.unwrap_model(model)
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            source_config = Path(source) / "config.json"
            if source_config.exists():
                shutil.copyfile(source_config, tmp / "config.json")
    accelerator.wait_for_everyone()
