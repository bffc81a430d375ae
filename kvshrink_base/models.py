"""The one loader of a causal LM checkpoint and its tokenizer, through the stock Auto classes.

Every command (uptraining, evaluation, sampling, the decode bench, the demo) loads through here, so a
checkpoint that will not load is always the same one line (a ``ModelError``), never a transformers traceback.
Checking a local checkpoint's files before loading it (a missing directory, truncated weights) is the
converter's (``convert.source.check_checkpoint``): the callers that take a user's path run it first. Where a
model goes is theirs too: the device ``kvshrink_base.device.pick_device`` chose for their ``--device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvshrink_base.errors import KvshrinkError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


class ModelError(KvshrinkError):
    """A model or tokenizer that does not load, or a device it cannot go to: one line, exit code 2."""


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    what: str = "model",
    **kwargs: Any,
) -> PreTrainedModel:
    """A checkpoint as ``AutoModelForCausalLM``, in eval mode.

    Args:
        path: a checkpoint directory or hub id.
        dtype: ``"auto"`` (the checkpoint's own), a ``torch.dtype`` or its name (``"bfloat16"``).
        device: where to put it, as ``kvshrink_base.device.pick_device`` chose it; None: where transformers loads it
            (the CPU).
        what: how the error line names it ("model", "teacher").
        **kwargs: passed to ``from_pretrained`` (``attn_implementation="sdpa"``).

    Raises:
        ModelError: the weights or config do not load, or the model cannot go to ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the {what} {path}: {first_line(exc)}") from None
    if device is not None:
        try:
            model.to(device)  # type: ignore[arg-type]  # functools.wraps gives .to the unbound Module.to signature
        except RuntimeError as exc:
            raise ModelError(f"--device {device}: {first_line(exc)}") from None
    return model.eval()


def load_config(path: str | Path, what: str = "model") -> PretrainedConfig:
    """A checkpoint's config (``AutoConfig``), to check a setting against before the weights load.

    Raises:
        ModelError: the config does not load.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the {what} {path}: {first_line(exc)}") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint; a checkpoint saved without one is named as such.

    Raises:
        ModelError: no tokenizer files, or a tokenizer that does not load.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        directory = Path(path).expanduser()
        if directory.is_dir() and not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(
                f"{path} has no tokenizer (no {', '.join(TOKENIZER_FILES[:4])}): save the tokenizer "
                "of the model it came from into it"
            ) from None
        raise ModelError(f"the tokenizer of {path} does not load: {first_line(exc)}") from None


def load_model_and_tokenizer(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    what: str = "model",
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) of a checkpoint: the tokenizer first, as it fails faster.

    Args and Raises: as ``load_model`` and ``load_tokenizer``.
    """
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype, device, what, **kwargs), tokenizer
