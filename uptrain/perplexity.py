"""The one eval loop: mean next-token loss and perplexity of a model on token blocks.

``perplexity`` scores text files (``python -m uptrain.evaluate``, the comparison, the demo, the benches);
``eval_metrics`` scores the uptrainer's eval blocks during training, summed across processes. The text goes
through the same pipeline as training (``uptrain.data``: documents joined with EOS, cut into ``seq_len``
blocks); the first ``max_tokens`` worth of blocks are scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvshrink_base.models import load_model_and_tokenizer
from uptrain import data
from uptrain.errors import RecipeError
from uptrain.loss import token_losses

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def check_setting(seq_len: int, max_tokens: int, batch_size: int = 1, positions: int | None = None) -> None:
    """Refuse an eval setting that cannot run: a non-positive size, or blocks beyond the model's positions."""
    for flag, value in (("--seq-len", seq_len), ("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value <= 0:
            raise RecipeError(f"{flag} must be positive, got {value}")
    if positions is not None and seq_len > positions:
        raise RecipeError(f"--seq-len {seq_len} is beyond the model's {positions} positions; use at most {positions}")


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    files: list[str],
    seq_len: int = 1024,
    max_tokens: int = 200_000,
    batch_size: int = 4,
    text_field: str = "text",
    progress: str | None = None,
) -> dict[str, float]:
    """Mean next-token loss, perplexity and token count of `model` on the blocks of `files`.

    `progress`, when given, is the label of a progress bar over the batches.

    Raises:
        RecipeError: a non-positive size, or too little text. Blocks beyond the model's positions are the
            caller's to refuse (``check_setting`` with ``positions``): rotary models still run there.
        DataError: files that cannot be read (``kvshrink_base.text``).
    """
    from tqdm.auto import tqdm

    check_setting(seq_len, max_tokens, batch_size)
    docs = data.load_documents(files, text_field)
    blocks = data.pack(docs, tokenizer, text_field, seq_len)
    blocks = blocks.select(range(min(len(blocks), max(1, max_tokens // seq_len)))).with_format("torch")
    if len(blocks) == 0:
        raise RecipeError(f"the data gives no block of {seq_len} tokens; add text or lower --seq-len")
    loader = torch.utils.data.DataLoader(blocks, batch_size=batch_size, collate_fn=data.collate)
    batches = tqdm(loader, desc=progress, unit="batch", disable=progress is None, leave=False)
    loss, tokens = loss_sums(model, batches, next(model.parameters()).device)
    return mean_loss(loss.item(), int(tokens.item()))


def perplexities(model_dir: str | Path, texts: dict[str, Path], seq_len: int, max_tokens: int) -> dict[str, float]:
    """{name: perplexity} of the checkpoint at ``model_dir`` (float32, CPU) on each named text file, rounded to
    0.01: the benches' scoring of a model on several texts."""
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=torch.float32)
    return {
        name: round(perplexity(model, tokenizer, [str(f)], seq_len, max_tokens)["ppl"], 2) for name, f in texts.items()
    }


def loss_sums(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ next-token loss, tokens scored) over batches of (B, T) ``input_ids``, float64 on ``device``."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"].to(device)
            loss += token_losses(model(input_ids=ids).logits, ids).double()
            tokens += ids[:, 1:].numel()
    model.train(was_training)
    return loss, tokens


def mean_loss(loss: float, tokens: int) -> dict[str, float]:
    """{"loss": mean next-token loss, "ppl": its exp, "tokens": tokens scored}."""
    return {"loss": loss / tokens, "ppl": math.exp(min(loss / tokens, 700)), "tokens": tokens}


@torch.no_grad()
def eval_metrics(
    model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], accelerator: Accelerator
) -> dict[str, float]:
    """The uptrainer's in-loop eval: mean next-token loss, perplexity and scored tokens over the eval blocks,
    summed across processes, as ``eval_loss``, ``eval_ppl``, ``eval_tokens``."""
    loss, tokens = loss_sums(model, loader, accelerator.device)
    loss, tokens = accelerator.reduce(loss, "sum"), accelerator.reduce(tokens, "sum")
    result = mean_loss(loss.item(), int(tokens.item()))
    return {"eval_loss": result["loss"], "eval_ppl": result["ppl"], "eval_tokens": result["tokens"]}
