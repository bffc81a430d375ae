"""Sequential calibration: each layer's moment measured on the inputs the converted model will give it.

Parallel calibration (``convert.calibrate.attention_moments``) runs the source model once and hooks every
layer: layer l is fitted to the activations of the *original* layers below it. Here, as GPTQ does, the
calibration hidden states are held in memory and pushed through the decoder one layer at a time: layer l's
moment is collected, layer l is converted (``convert.layers.rewrite``) and written back into the running
model with its merged K/V heads repeated (the same function at the source's head count), and only then does
the layer turn its inputs into layer l + 1's. Each layer runs twice over the calibration tokens (once to
measure, once converted to move on): the cost of two forward passes; with ``refit_o`` three (the converted
heads' outputs are collected before the refitted O moves on), and the original heads' outputs of one layer
(tokens x heads x head_dim x 4 bytes) are held meanwhile. With ``local_steps`` (``refine``) the original
attention module's inputs and outputs of one layer are kept from the measuring pass (2 x tokens x hidden x 4
bytes) and the layer's Q, merged K/V and O take that many Adam steps towards them.

Memory: the source model, one float64 (hidden + 1)² moment per layer, and the hidden states of every
calibration token: tokens x hidden x 4 bytes in float32 (65,536 tokens of a 4,096-wide model: 1.07 GB).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from convert.calibrate import calibration_model, moment_hook
from convert.layers import LayerPlan, rewrite

LOCAL_BLOCKS = 4  # calibration blocks per local refinement step


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
            hooks = {plan.modules[layer]: moment_hook(plan.moments, layer)}
            heads_out: list = []  # the original heads' outputs (o_proj's input), for the refit
            if plan.refit_o:
                hooks[_o_module(plan, layer)] = lambda _m, args: heads_out.append(args[0].detach())
            attention = _attention_io(model, plan, layer) if plan.local_steps else None
            _run(model, decoder, inputs, hooks)
            if attention is not None:
                attention.remove()  # the original layer's calls only
            plan.moments[layer] = plan.moments[layer].cpu()
            heads, has_bias = rewrite(plan, load, layer)  # the layer's merge, computed once here
            _load_converted(model, plan, layer, heads, has_bias)
            if plan.refit_o:
                heads = _refit_o(model, decoder, plan, load, layer, inputs, heads_out, heads)
            refined = ""
            if attention is not None:
                first, last, better = refine(model, plan, layer, attention.seen, heads, has_bias)
                refined = f", local relative error {first:.4f} -> {last:.4f}"
                if better is not None:
                    _load_converted(model, plan, layer, better, has_bias)
            inputs = [(_hidden(decoder(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
            print(f"calibrating (sequential): layer {layer + 1}/{plan.dims.layers} "
                  f"({time.perf_counter() - started:.0f} s{refined})", flush=True)
    return {"moments": plan.moments, "tokens": blocks.numel(), "seconds": round(time.perf_counter() - started, 2)}


def _run(model, decoder, inputs: list, hooks: dict) -> None:
    """The decoder layer over every block with forward pre-hooks on the named modules (outputs dropped)."""
    handles = [model.get_submodule(path).register_forward_pre_hook(hook) for path, hook in hooks.items()]
    try:
        for hidden, kwargs in inputs:
            decoder(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _o_module(plan: LayerPlan, layer: int) -> str:
    return plan.sources[layer]["o", "weight"].removesuffix(".weight")


def _refit_o(model, decoder, plan: LayerPlan, load: Callable[[str], Any], layer: int, inputs: list,
             heads_out: list, heads):
    """O' = argmin Σ ‖O' z' − O z‖² + ridge: the converted heads' outputs z' mapped onto the original attention
    output (float64 moments, closed form); written into the model and kept in ``plan.refits`` for the writer.

    The cross moment Σ z zᵀ' pairs each block's original heads' outputs with the converted ones, in order.

    Returns:
        ``heads`` with the refitted O.
    """
    import torch

    gram, cross, seen = None, None, iter(heads_out)

    def add(_module, args):
        nonlocal gram, cross
        z_new = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, H*d)
        z_old = next(seen).reshape(-1, args[0].shape[-1]).double()
        gram = z_new.T @ z_new if gram is None else gram + z_new.T @ z_new
        cross = z_old.T @ z_new if cross is None else cross + z_old.T @ z_new

    _run(model, decoder, inputs, {_o_module(plan, layer): add})
    gram, cross = gram.cpu(), cross.cpu()  # summed where the layer runs (a GPU), solved here
    o = model.get_submodule(_o_module(plan, layer))
    original = load(plan.sources[layer]["o", "weight"]).double()  # (out, H*d)
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    refit = torch.linalg.solve(gram + ridge, (original @ cross).T).T  # (out, H*d) = O C_x (G + λI)⁻¹
    heads = heads.replace(o=refit.reshape(heads.o.shape))
    plan.refits[layer] = _kept(heads)
    o.weight.copy_(refit.to(o.weight.dtype))
    return heads


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


def _kept(heads):
    """What ``plan.refits`` holds until the writer takes it: float32 (the merge computes in float64)."""
    return heads.replace(**{role: getattr(heads, role).float() for role in "qkvo"})


def _load_converted(model, plan: LayerPlan, layer: int, new, has_bias: bool) -> None:
    """Write the converted layer into the running source model, each merged K/V head repeated for its group."""
    from convert import surgery

    repeat = plan.dims.kv_heads // plan.kv_heads
    expanded = new.replace(k=new.k.repeat_interleave(repeat, 0), v=new.v.repeat_interleave(repeat, 0))
    fused = plan.layout if "qkv" in plan.changed else None
    for (role, param), tensor in surgery.from_heads(expanded, has_bias, fused, lambda role: True).items():
        if (role, param) in plan.sources[layer]:
            target = model.get_parameter(plan.sources[layer][role, param])
            target.copy_(tensor.to(target.dtype))


class _AttentionIO:
    """A forward hook on a layer's attention module keeping every call's inputs and output (the original's)."""

    def __init__(self, module):
        self.module, self.seen = module, []
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs, output):
        self.seen.append((args, dict(kwargs), _hidden(output).detach()))

    def remove(self) -> None:
        self.handle.remove()


def _attention_path(plan: LayerPlan, layer: int) -> str:
    """The module holding all of a layer's attention projections: the longest common prefix of their modules."""
    import os

    return ".".join(os.path.commonprefix([name.split(".")[:-2] for name in plan.sources[layer].values()]))


def _normal(value):
    """A copy of inference-mode tensors (nested in tuples, lists, dicts) that autograd may save."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_normal(v) for v in value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _attention_io(model, plan: LayerPlan, layer: int) -> _AttentionIO:
    return _AttentionIO(model.get_submodule(_attention_path(plan, layer)))


def refine(model, plan: LayerPlan, layer: int, seen: list, heads, has_bias: bool) -> tuple[float, float, Any]:
    """``plan.local_steps`` Adam steps on the layer's converted Q, merged K/V and O (head form, biases included)
    so that its attention module reproduces the original's output on the calibration inputs (squared error,
    ``LOCAL_BLOCKS`` blocks per step in a seeded shuffled order; each tensor's learning rate is ``plan.local_lr``
    times its root mean square, so the steps are the same relative size in a model of any width). The refined
    heads replace the layer's in ``plan.refits`` only if their error on all the calibration blocks is lower
    (Adam near a zero loss wanders).

    Returns:
        The relative error ‖attention' − attention‖ / ‖attention‖ on the calibration blocks before and after,
        and the refined heads (None where they were not better than ``heads``).
    """
    import torch

    fit = _LocalFit(model, plan, layer, heads, has_bias)
    generator = torch.Generator().manual_seed(plan.seed + layer)
    with torch.inference_mode(False), torch.enable_grad():
        for i, entry in enumerate(seen):  # inference-mode tensors cannot be saved for backward: copied one by one
            seen[i] = _normal(entry)
        trained = {role: getattr(fit.start, role).to(fit.device, torch.float32, copy=True).requires_grad_(True)
                   for role in "qkvo"}
        before = fit.error(trained, seen)
        optimizer = torch.optim.Adam([{"params": [t], "lr": plan.local_lr * t.detach().pow(2).mean().sqrt().item()}
                                      for t in trained.values()])  # steps in proportion to each tensor's scale
        for _step in range(plan.local_steps):
            optimizer.zero_grad(set_to_none=True)
            for i in torch.randperm(len(seen), generator=generator)[:LOCAL_BLOCKS].tolist():
                args, kwargs, target = seen[i]
                (fit.output(trained, args, kwargs) - target.float()).pow(2).sum().backward()
            optimizer.step()
        after = fit.error(trained, seen)
    if after >= before:
        return before, before, None
    plan.refits[layer] = fit.start.replace(**{role: t.detach().cpu() for role, t in trained.items()})
    return before, after, plan.refits[layer]


class _LocalFit:
    """A layer's attention module called with its projections taken from trainable head-form tensors."""

    def __init__(self, model, plan: LayerPlan, layer: int, start, has_bias: bool):
        path = _attention_path(plan, layer)
        self.module = model.get_submodule(path)
        self.start, self.has_bias = start, has_bias
        self.repeat = plan.dims.kv_heads // plan.kv_heads
        self.fused = plan.layout if "qkv" in plan.changed else None
        self.names = {key: name.removeprefix(path + ".") for key, name in plan.sources[layer].items()}
        weight = model.get_parameter(next(iter(plan.sources[layer].values())))
        self.device, self.dtype = weight.device, weight.dtype  # a GPU runs the layer in the model's dtype

    def output(self, trained: dict, args: tuple, kwargs: dict):
        """The attention module's output (float32) with ``trained``'s Q, K/V (each repeated for its group), O."""
        from torch.func import functional_call

        from convert import surgery

        heads = self.start.replace(q=trained["q"], o=trained["o"], k=trained["k"].repeat_interleave(self.repeat, 0),
                                   v=trained["v"].repeat_interleave(self.repeat, 0))
        tensors = surgery.from_heads(heads, self.has_bias, self.fused, lambda role: True)
        params = {self.names[key]: t.to(self.dtype) for key, t in tensors.items() if key in self.names}
        return _hidden(functional_call(self.module, params, args, kwargs)).float()

    def error(self, trained: dict, seen: list) -> float:
        import torch

        with torch.no_grad():
            wrong = sum((self.output(trained, a, k) - t.float()).pow(2).sum().item() for a, k, t in seen)
        return (wrong / sum(t.float().pow(2).sum().item() for _a, _k, t in seen)) ** 0.5
