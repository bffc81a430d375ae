"""Greedy continuations of the same prompts by several models, shown side by side (the demo, the decode bench),
and the one way to hand a forward its KV cache (``with_cache``: the decode bench, ``kvshrink_base.sample``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase


def greedy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], new_tokens: int
) -> list[str]:
    """Each prompt's greedy continuation (``[end of text]`` appended where the model stopped by itself)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.inference_mode():
            # generate is GenerationMixin's, which the concrete *ForCausalLM class adds to PreTrainedModel
            ids = model.generate(  # type: ignore[operator]
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
        new = ids[0, inputs["input_ids"].shape[1] :]
        ended = len(new) > 0 and new[-1].item() == tokenizer.eos_token_id
        # decode returns str for one sequence (its annotation also allows a batch's list[str])
        text: str = tokenizer.decode(new, skip_special_tokens=True)  # type: ignore[assignment]
        texts.append(text + (" [end of text]" if ended else ""))
    return texts


def with_cache(model: torch.nn.Module | Callable[..., Any], cache: Cache) -> dict[str, Cache]:
    """The keyword argument that hands ``cache`` (a KV cache) to ``model``'s forward: ``cache`` where the
    forward has it (transformers 5.24 renamed it and deprecates ``past_key_values`` until 5.40), else
    ``past_key_values``. ``model`` is a model, or its forward itself (under ``torch.compile``: the decode bench's
    ``--static-cache compile``, whose compiled function has no ``forward``)."""
    import inspect

    import torch

    forward = model.forward if isinstance(model, torch.nn.Module) else model
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {name: cache}


def one_line(text: str) -> str:
    """A continuation on one line: its lines joined with " / " (one made only of line breaks says so)."""
    joined = " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return joined or ("(line breaks only)" if text else "(nothing)")


def side_by_side(prompts: list[str], outputs: dict[str, list[str]]) -> list[str]:
    """Report lines: each prompt, then every model's continuation of it on one line."""
    width = max(map(len, outputs))
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"  prompt: {prompt!r}")
        lines += [f"    {label:<{width}} | {one_line(texts[i])}" for label, texts in outputs.items()]
    return lines
