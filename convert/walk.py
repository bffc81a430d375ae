"""What calibration's walk through the decoder layers shares: the loader, the plan, the hidden states.

``Walk`` is the state of one walk (``convert.calibrate.calibrate_layers``): the model skeleton with the current
layer onloaded (``convert.onload.LayerLoader``), the layer plan, the calibration hidden states of every block
(``HiddenStates``) and how the model calls each decoder layer (``convert.onload.LayerCall``). The refinements
(``convert.refine``) and the walk itself call a layer through ``Walk.run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from convert.head_form import LayerHeads
from convert.heads import from_heads, kv_norm, norm_heads
from convert.layers import LayerPlan, LayerState
from convert.onload import LayerCall, LayerLoader
from convert.stages import Stages

if TYPE_CHECKING:
    import torch

Hook = Callable[["torch.nn.Module", tuple[Any, ...]], None]  # a forward pre-hook: (module, positional args)


def hidden(output: torch.Tensor | tuple[Any, ...]) -> torch.Tensor:
    """A decoder layer's or attention module's hidden states: older transformers return (hidden, ...)."""
    return output[0] if isinstance(output, tuple) else output


class HiddenStates:
    """The calibration hidden states, one (1, seq, hidden) tensor per block: on the device, or waiting in CPU
    memory (pinned for CUDA) and moved to the device one block at a time.

    ``keep`` puts a tensor where the blocks live as soon as it is made, so that with the offload no block's
    output stays on the device; the copy to CPU memory is one copy (into pinned memory directly for CUDA).
    """

    def __init__(self, device: torch.device, on_device: bool, blocks: list[torch.Tensor] | None = None):
        self.device, self.on_device = device, on_device
        self.blocks = [self.keep(b) for b in blocks or []]

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the blocks live: the device, or CPU memory (pinned for CUDA)."""
        import torch

        if self.on_device:
            return tensor.to(self.device)
        if tensor.device.type == "cpu" and self.device.type != "cuda":
            return tensor
        home = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.device.type == "cuda")
        return home.copy_(tensor, non_blocking=False)

    def fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A kept tensor on the device (from pinned memory without blocking the host)."""
        return tensor.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for block in self.blocks:
            yield self.fetch(block)

    def __len__(self) -> int:
        return len(self.blocks)

    def replace(self, blocks: list[torch.Tensor]) -> None:
        """The next layer's inputs (already kept by ``keep``)."""
        self.blocks = blocks


@dataclass
class Walk:
    """One calibration walk: the model with its current layer, the plan, the hidden states, the call's kwargs."""

    loader: LayerLoader
    plan: LayerPlan
    state: LayerState
    load: Callable[[str], torch.Tensor]  # output name -> the source tensor (Linear layout), as the layer path reads it
    states: HiddenStates
    calls: list[LayerCall]  # how the model calls each decoder layer (``convert.onload.layer_calls``)
    seed: int = 0
    stages: Stages = field(default_factory=Stages)  # seconds per stage (``convert.stages``)

    def path(self, name: str) -> str:
        """The model's module holding the tensor with this output name."""
        return self.loader.module_path(self.plan.source_names[name])

    def attention_path(self, layer: int) -> str:
        """The module holding all of a layer's attention projections: the longest common prefix of their modules."""
        paths = [self.path(name).split(".") for name in self.plan.sources[layer].values()]
        return ".".join(os.path.commonprefix(paths))

    def relative(self, name: str, module: str) -> str:
        """The model's name of a tensor, relative to ``module`` (for ``functional_call``)."""
        return self.loader.model_name[self.plan.source_names[name]].removeprefix(module + ".")

    def source_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A Linear-layout (out, in) tensor as the source stores it (Conv1D: transposed)."""
        return tensor.t() if name in self.plan.transposed else tensor

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Overwrite the running model's tensor with this output name (Linear layout) in place."""
        param = self.loader.parameter(self.plan.source_names[name])
        param.data.copy_(self.source_layout(name, tensor).to(param.device, param.dtype))

    def run(self, layer: int, decoder: torch.nn.Module, hooks: dict[str, Hook], keep: bool) -> list[torch.Tensor]:
        """Decoder layer ``layer`` over every block, called as the model calls it, with forward pre-hooks on the
        named modules; the outputs if ``keep`` (else none), each put where the blocks live as it is made."""
        model = self.loader.model
        call = self.calls[layer]
        handles = [model.get_submodule(path).register_forward_pre_hook(hook) for path, hook in hooks.items()]
        outputs: list[torch.Tensor] = []
        try:
            with self.stages.timed("forward"):
                for block in self.states:
                    out = hidden(decoder(block, *call.args, **call.kwargs))
                    if keep:
                        outputs.append(self.states.keep(out))
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def write_converted(self, layer: int, new: LayerHeads, has_bias: bool) -> None:
        """Write a converted layer into the running source model: each merged K/V head repeated for its group,
        the pooled K norms likewise; the model then computes what the converted model will."""
        plan = self.plan
        repeat = plan.dims.kv_heads // plan.kv_heads
        expanded = new.replace(k=new.k.repeat_interleave(repeat, 0), v=new.v.repeat_interleave(repeat, 0))
        fused = plan.layout if "qkv" in plan.changed else None

        def wanted(role: str) -> bool:
            return role == "qkv" or getattr(expanded, role) is not None

        for key, tensor in from_heads(expanded, has_bias, fused, wanted).items():
            if key in plan.sources[layer]:
                self.write(plan.sources[layer][key], tensor)
        for name, tensor in self.expanded_norms(layer).items():
            self.write(name, tensor)

    def expanded_norms(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's K norms pooled as the output has them, each pooled norm repeated for its group's heads."""
        plan = self.plan
        kv_in, kv_out = plan.dims.kv_heads, plan.kv_heads
        repeat = kv_in // kv_out
        norms = plan.norms.get(layer, [])
        per_head = {n.head: n.name for n in norms if n.operation == "pool_norm_heads"}
        out = {}
        for norm in norms:
            if norm.operation == "pool_norm":
                t = self.load(norm.name)
                pooled = kv_norm(t, kv_heads_in=kv_in, kv_heads=kv_out, method=plan.method)
                out[norm.name] = pooled.reshape(kv_out, -1).repeat_interleave(repeat, 0).reshape(t.shape)
            else:
                if norm.head is None:
                    raise ValueError(f"{norm.name} is pooled per head but names no head")
                first = norm.head // repeat * repeat
                members = [self.load(per_head[h]) for h in range(first, first + repeat)]
                out[norm.name] = norm_heads(*members, method=plan.method)
        return out
