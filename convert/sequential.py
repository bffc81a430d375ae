"""Sequential calibration: each layer's moment measured on the inputs the converted model will give it.

Parallel calibration (``convert.calibrate.attention_moments``) runs the source model once and hooks every
layer: layer l is fitted to the activations of the *original* layers below it. Here, as GPTQ does, the
calibration hidden states are held in memory and pushed through the decoder one layer at a time: layer l's
moment is collected, layer l is converted (``convert.layers.rewrite``) and written back into the running
model with its merged K/V heads repeated (the same function at the source's head count), and only then does
the layer turn its inputs into layer l + 1's. Each layer runs twice over the calibration tokens (once to
measure, once converted to move on): the cost of two forward passes.

Memory: the source model, one float64 (hidden + 1)² moment per layer, and the hidden states of every
calibration token: tokens x hidden x 4 bytes in float32 (65,536 tokens of a 4,096-wide model: 1.07 GB).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from convert.calibrate import calibration_model, moment_hook
from convert.layers import LayerPlan, rewrite


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first decoder layer's inputs are captured."""


def sequential_moments(source: Path, plan: LayerPlan, load: Callable[[str], Any], documents: list[str],
                       tokens: int, seq_len: int) -> dict:
    """Per layer, C = Σ [x, 1][x, 1]ᵀ with the layers below already converted; fills ``plan.moments``.

    Returns:
        {"moments": [...], "tokens": n, "seconds": s}, as ``attention_moments``.
    """
    import torch

    started = time.perf_counter()
    model, blocks = calibration_model(source, documents, tokens, seq_len)
    plan.moments = [None] * plan.dims.layers
    with torch.inference_mode():
        inputs = _first_layer_inputs(model, model.get_submodule(plan.decoders[0]), blocks)
        for layer in range(plan.dims.layers):
            decoder = model.get_submodule(plan.decoders[layer])
            hook = model.get_submodule(plan.modules[layer]).register_forward_pre_hook(moment_hook(plan.moments, layer))
            try:
                for hidden, kwargs in inputs:
                    decoder(hidden, **kwargs)
            finally:
                hook.remove()
            plan.moments[layer] = plan.moments[layer].cpu()
            _load_converted(model, plan, load, layer)
            inputs = [(_hidden(decoder(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
            print(f"calibrating (sequential): layer {layer + 1}/{plan.dims.layers} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {"moments": plan.moments, "tokens": blocks.numel(), "seconds": round(time.perf_counter() - started, 2)}


def _first_layer_inputs(model, first, blocks) -> list[tuple[Any, dict]]:
    """(hidden states, keyword arguments) with which the model calls its first decoder layer, per block."""
    captured = []

    def grab(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for block in blocks:
            try:
                model(block.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(output) -> Any:
    return output[0] if isinstance(output, tuple) else output  # older transformers return (hidden, ...)


def _load_converted(model, plan: LayerPlan, load: Callable[[str], Any], layer: int) -> None:
    """Write the converted layer into the running source model, each merged K/V head repeated for its group."""
    from convert import surgery

    new, has_bias = rewrite(plan, load, layer)
    repeat = plan.dims.kv_heads // plan.kv_heads
    expanded = new.replace(k=new.k.repeat_interleave(repeat, 0), v=new.v.repeat_interleave(repeat, 0))
    fused = plan.layout if "qkv" in plan.changed else None
    for (role, param), tensor in surgery.from_heads(expanded, has_bias, fused, lambda role: True).items():
        if (role, param) in plan.sources[layer]:
            target = model.get_parameter(plan.sources[layer][role, param])
            target.copy_(tensor.to(target.dtype))
