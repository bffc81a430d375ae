"""Training checkpoints (accelerate state, written atomically) and the final Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from uptrain.recipe import RecipeError

_STEP = re.compile(r"step-(\d+)")
STATE = "trainer_state.json"


def _complete(out: Path) -> list[Path]:
    """Checkpoints that finished writing (a killed save leaves only a .tmp-step-N directory)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name)[1]))


def newest(out: Path) -> Path | None:
    done = _complete(out)
    return done[-1] if done else None


def find_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint to continue from: `auto` (newest, if any), `never`, or a path."""
    if resume == "auto":
        return newest(out)
    if resume == "never":
        if _complete(out):
            raise RecipeError(f"{out} already has checkpoints and resume is never; use resume: auto or a new "
                              "output_dir")
        return None
    path = Path(resume)
    if not (path / STATE).exists():
        raise RecipeError(f"resume: {resume} is not a complete checkpoint (no {STATE})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def save(accelerator, out: Path, step: int, keep_last: int) -> Path:
    """accelerator.save_state into checkpoints/step-N via a temporary name, then keep the newest keep_last."""
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
            (tmp / STATE).write_text(json.dumps({"step": step}) + "\n")
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


def save_final(accelerator, model, tokenizer, source: str, final: Path, dtype) -> None:
    """OUTPUT_DIR/final: safetensors in the student's original dtype, its own config.json, the tokenizer.

    The config is the source checkpoint's file, not a re-serialization through transformers (which can
    rewrite keys such as rope_theta for newer readers only).
    """
    state = accelerator.get_state_dict(model)  # gathered from every process (FSDP included)
    if accelerator.is_main_process:
        tmp = final.parent / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source_config = Path(source) / "config.json"
        if source_config.exists():
            shutil.copyfile(source_config, tmp / "config.json")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
