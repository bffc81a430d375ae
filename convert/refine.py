"""The refinements of sequential calibration: the O refit and the local steps, one layer at a time.

With ``--refit-o`` the converted heads' outputs are collected in a third pass over the layer and O is refitted
by least squares onto the original attention output (the original heads' outputs of one layer, tokens x heads x
head_dim, are held meanwhile). With ``--local-steps`` the original attention module's inputs and outputs of the
layer are kept from the measuring pass (2 x tokens x hidden) and the layer's Q, merged K/V and O take that many
Adam steps towards them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from convert.head_form import LayerHeads
from convert.heads import from_heads
from convert.walk import Walk, hidden

if TYPE_CHECKING:
    import torch

AttentionCall = tuple[tuple[Any, ...], dict[str, Any], "torch.Tensor"]  # an attention call's args, kwargs, output

LOCAL_BLOCKS = 4  # calibration blocks per local refinement step
LOCAL_LR = 5e-3  # relative to each tensor's root mean square (tuned on SmolLM2-135M: docs/convert.md)


def refit_o(
    walk: Walk, layer: int, decoder: torch.nn.Module, heads_out: list[torch.Tensor], heads: LayerHeads
) -> LayerHeads:
    """O' = argmin Σ ‖O' z' − O z‖² + ridge: the converted heads' outputs z' mapped onto the original attention
    output (float64 moments on the CPU, closed form); written into the running model.

    The cross moment Σ z zᵀ' pairs each block's original heads' outputs with the converted ones, in order.

    Returns:
        ``heads`` with the refitted O.
    """
    import torch

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    seen, fetch = iter(heads_out), walk.states.fetch

    def add(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal gram, cross
        z_new = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, H*d)
        z_old = fetch(next(seen)).reshape(-1, args[0].shape[-1]).float()
        block_gram = (z_new.T @ z_new).to("cpu", torch.float64)  # float32 per block, summed in float64
        block_cross = (z_old.T @ z_new).to("cpu", torch.float64)
        gram = block_gram if gram is None else gram + block_gram
        cross = block_cross if cross is None else cross + block_cross

    o_name = walk.plan.sources[layer]["o", "weight"]
    walk.run(layer, decoder, {walk.path(o_name): add}, keep=False)
    if gram is None or cross is None:
        raise ValueError("the O refit ran over no calibration block")
    original = walk.load(o_name).double()  # (out, H*d)
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    refit = torch.linalg.solve(gram + ridge, (original @ cross).T).T  # (out, H*d) = O C_x (G + λI)⁻¹
    walk.write(o_name, refit)
    return heads.replace(o=refit.reshape(heads.loaded("o").shape))


class AttentionIO:
    """A forward hook on a layer's attention module keeping every call's inputs and output (the original's).

    The hidden states in and out go through ``keep`` (off the device when the blocks wait in CPU memory); the
    keyword arguments (mask, positions, RoPE) are the layer's own, the same tensors for every block.
    """

    def __init__(self, module: torch.nn.Module, keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
        self.module, self.keep = module, keep
        self.seen: list[AttentionCall] = []
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def __call__(
        self,
        _module: torch.nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: torch.Tensor | tuple[Any, ...],
    ) -> None:
        import torch

        kept = tuple(self.keep(a.detach()) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs["hidden_states"] = self.keep(kwargs["hidden_states"].detach())
        self.seen.append((kept, kwargs, self.keep(hidden(output).detach())))

    def remove(self) -> None:
        self.handle.remove()


def _usable(value: Any, device: torch.device) -> Any:
    """``value`` (tensors nested in tuples, lists, dicts) on ``device``, as tensors autograd may save (an
    inference-mode tensor is copied; one moved from CPU memory is new already). Made per use, so that no second
    copy of every block is held."""
    import torch

    if isinstance(value, torch.Tensor):
        moved = value.to(device, non_blocking=True)
        return moved.clone() if moved.is_inference() else moved
    if isinstance(value, (tuple, list)):
        return type(value)(_usable(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _usable(v, device) for k, v in value.items()}
    return value


def refine(
    walk: Walk, layer: int, steps: int, seen: list[AttentionCall], heads: LayerHeads, has_bias: bool
) -> tuple[float, float, LayerHeads | None]:
    """``steps`` Adam steps on the layer's converted Q, merged K/V and O (head form, biases included) so that its
    attention module reproduces the original's output on the calibration inputs (squared error, ``LOCAL_BLOCKS``
    blocks per step in a seeded shuffled order; each tensor's learning rate is ``LOCAL_LR`` times its root mean
    square, so the steps are the same relative size in a model of any width). The refined heads are kept only if
    their error on all the calibration blocks is lower (Adam near a zero loss wanders).

    Returns:
        The relative error ‖attention' − attention‖ / ‖attention‖ on the calibration blocks before and after,
        and the refined heads (None where they were not better than ``heads``).
    """
    import torch

    fit = _LocalFit(walk, layer, heads, has_bias)
    generator = torch.Generator().manual_seed(walk.seed + layer)
    with torch.inference_mode(False), torch.enable_grad():
        trained = {
            role: heads.loaded(role).to(fit.device, torch.float32, copy=True).requires_grad_(True) for role in "qkvo"
        }
        before = fit.error(trained, seen)
        optimizer = torch.optim.Adam(
            [{"params": [t], "lr": LOCAL_LR * t.detach().pow(2).mean().sqrt().item()} for t in trained.values()]
        )  # steps in proportion to each tensor's scale
        for _step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for i in torch.randperm(len(seen), generator=generator)[:LOCAL_BLOCKS].tolist():
                args, kwargs, target = _usable(seen[i], fit.device)
                (fit.output(trained, args, kwargs) - target.float()).pow(2).sum().backward()
            optimizer.step()
        after = fit.error(trained, seen)
    if after >= before:
        return before, before, None
    return before, after, heads.replace(**{role: t.detach().cpu() for role, t in trained.items()})


class _LocalFit:
    """A layer's attention module called with its projections taken from trainable head-form tensors."""

    def __init__(self, walk: Walk, layer: int, start: LayerHeads, has_bias: bool):
        plan = walk.plan
        self.walk, self.path = walk, walk.attention_path(layer)
        self.module = walk.loader.model.get_submodule(self.path)
        self.start, self.has_bias = start, has_bias
        self.repeat = plan.dims.kv_heads // plan.kv_heads
        self.fused = plan.layout if "qkv" in plan.changed else None
        self.names = plan.sources[layer]
        weight = walk.loader.parameter(plan.source_names[next(iter(self.names.values()))])
        self.device, self.dtype = weight.device, weight.dtype  # an accelerator runs the layer in the source dtype

    def output(self, trained: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The attention module's output (float32) with ``trained``'s Q, K/V (each repeated for its group), O."""
        from torch.func import functional_call

        heads = self.start.replace(
            q=trained["q"],
            o=trained["o"],
            k=trained["k"].repeat_interleave(self.repeat, 0),
            v=trained["v"].repeat_interleave(self.repeat, 0),
        )
        tensors = from_heads(heads, self.has_bias, self.fused, lambda role: True)
        params = {
            self.walk.relative(self.names[key], self.path): self.walk.source_layout(self.names[key], t).to(self.dtype)
            for key, t in tensors.items()
            if key in self.names
        }
        return hidden(functional_call(self.module, params, args, kwargs)).float()

    def error(self, trained: dict[str, torch.Tensor], seen: list[AttentionCall]) -> float:
        import torch

        with torch.no_grad():
            wrong = sum(
                (self.output(trained, *_usable((a, k), self.device)) - t.to(self.device).float()).pow(2).sum().item()
                for a, k, t in seen
            )
        return (wrong / sum(t.float().pow(2).sum().item() for _a, _k, t in seen)) ** 0.5
