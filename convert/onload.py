"""The source model with one decoder layer in memory at a time, read straight from its checkpoint.

The model is built by transformers from its config with every parameter on the ``meta`` device (accelerate's
``init_empty_weights``; buffers such as RoPE's frequencies are real), so the family's own layer code runs:
RoPE, masks and every family's quirks stay exact. The embeddings and other parameters outside the decoder
layers (the output head aside, which calibration never runs) are read once; a decoder layer's parameters are
read from the source's safetensors shards with the converter's own reader (``convert.source.WeightSource``,
which has checked every header) when calibration reaches it, and put back on ``meta`` when it is done.

    skeleton (meta)         layer l onloaded          layer l offloaded, l + 1 onloaded
    [emb] [0] [1] [2] ...   [emb] [0] [1] [2] ...     [emb] [0] [1] [2] ...
     real  -   -   -         real  -   X   -           real  -   -   X
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.source import WeightSource
from kvshrink_base.errors import first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

StateDictLoader = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]  # transformers' (see below)


def build_skeleton(src_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The source's model class from its config, every parameter on ``meta``, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(src_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(f"transformers cannot build the model of {src_dir} ({first_line(exc)})") from None
    return model.eval()


def output_head(model: PreTrainedModel) -> str | None:
    """The module path of the output embeddings (never run by calibration, never read)."""
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None)


def _transformers_loader() -> StateDictLoader | None:
    """transformers' own state-dict loader (renames, fused experts, dtype casts), where this version has one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None
    return get_model_conversion_mapping, convert_and_load_state_dict_in_model, LoadStateDictConfig


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


class LayerLoader:
    """A model skeleton whose decoder layers are materialized one at a time from the source checkpoint.

    Tensors are read with the converter's reader and handed to transformers' own loader (where it has one:
    it renames and fuses as ``from_pretrained`` does, e.g. Mixtral's experts); else matched by name.

    Args:
        src_dir: the source checkpoint directory (its config.json builds the model).
        weights: the source's tensors (already checked).
        anchors: per layer, the checkpoint name of a tensor inside that decoder layer (its Q or QKV weight).
        device: where layers run.
        dtype: the dtype they run in.
        materialize: read the resident parameters (embeddings) now; False: names and sizes only (a dry run).
    """

    def __init__(
        self,
        src_dir: Path,
        weights: WeightSource,
        anchors: list[str],
        device: torch.device,
        dtype: torch.dtype,
        materialize: bool = True,
    ):
        self.weights, self.device, self.dtype = weights, device, dtype
        self.model = build_skeleton(src_dir, dtype)
        self.model_name = self._model_names(weights)  # checkpoint tensor name -> model parameter name
        self.decoders = [self._decoder_of(anchor) for anchor in anchors]
        prefixes = [anchor.rsplit(".", 3)[0] + "." for anchor in anchors]  # the layer, as the checkpoint names it
        self.layer_tensors = [[n for n in weights.tensors if n.startswith(p)] for p in prefixes]
        in_layers = {n for names in self.layer_tensors for n in names}
        head = output_head(self.model)
        self.resident = [n for n in weights.tensors if n not in in_layers and not (head and n.startswith(head + "."))]
        self.layer_params = [
            [n for n, _ in self.model.named_parameters() if n.startswith(d + ".")] for d in self.decoders
        ]
        self.peak_layers = 0  # the most decoder layers ever materialized at once (tests read it)
        self.state_dict_loader = _transformers_loader()  # None: matched by name
        in_layers = {n for names in self.layer_params for n in names}
        self.resident_params = [
            n
            for n, _ in self.model.named_parameters()
            if n not in in_layers and not (head and n.startswith(head + "."))
        ]
        if materialize:
            self.materialize(self.resident)
            for name, buffer in list(self.model.named_buffers()):
                self._set(name, buffer.to(device))
            self._check_loaded(self.resident_params)

    def _model_names(self, weights: WeightSource) -> dict[str, str]:
        """Checkpoint names of the model's parameters, with or without the base model's prefix."""
        prefix = self.model.base_model_prefix + "."
        found = {}
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            for candidate in (name, name.removeprefix(prefix), prefix + name):
                if candidate in weights.tensors:
                    found[candidate] = name
                    break
        return found

    def _decoder_of(self, anchor: str) -> str:
        """The decoder layer module holding a layer's Q/QKV weight: ``...layers.3.self_attn.q_proj.weight``
        -> ``...layers.3``."""
        name = self.model_name.get(anchor)
        if name is None:
            raise ConversionError(f"the source model has no parameter for {anchor}")
        return name.rsplit(".", 3)[0]

    def _set(self, name: str, value: torch.Tensor) -> None:
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(self.model, name, value.device, value=value)

    def materialize(self, names: list[str]) -> None:
        """Read the named checkpoint tensors into the model, on the device, in the run dtype."""
        import torch

        with torch.inference_mode(False), torch.no_grad():  # parameters autograd may use (local steps)
            tensors = {name: self.weights.read(name) for name in names}
            if self.state_dict_loader is not None:
                mapping, load, config = self.state_dict_loader
                with _quiet_transformers():  # its "Loading weights" bar, once per layer, says nothing here
                    load(
                        self.model,
                        tensors,
                        config(weight_mapping=mapping(self.model), dtype=self.dtype, device_map={"": str(self.device)}),
                    )
                return
            for name, tensor in tensors.items():
                if name in self.model_name:
                    self._set(self.model_name[name], tensor.to(self.device, self.dtype))

    def _check_loaded(self, params: list[str]) -> None:
        missing = [n for n in params if self.model.get_parameter(n).is_meta]
        if missing:
            raise ConversionError(
                f"calibration runs the source one layer at a time, but its checkpoint gave no "
                f"tensor for the model's {missing[0]}; use an uncalibrated method (--method mean)"
            )

    def onload(self, layer: int) -> torch.nn.Module:
        """Read decoder layer ``layer`` from the checkpoint onto the device; returns its module."""
        self.materialize(self.layer_tensors[layer])
        self._check_loaded(self.layer_params[layer])
        self.peak_layers = max(self.peak_layers, self.materialized_layers())
        return self.model.get_submodule(self.decoders[layer])

    def offload(self, layer: int) -> None:
        """Put the layer's parameters back on ``meta`` (their memory is freed)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self.layer_params[layer]:
            set_module_tensor_to_device(self.model, name, "meta")
        _return_freed_memory()

    def release_resident(self) -> None:
        """Put the embeddings and other parameters outside the layers back on ``meta`` once the first layer's
        inputs are made (nothing after it runs them)."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self.resident_params:
            set_module_tensor_to_device(self.model, name, "meta")
        _return_freed_memory()

    def materialized_layers(self) -> int:
        """How many decoder layers have any parameter that is not on ``meta`` (counted from the tensors)."""
        return sum(any(not self.model.get_parameter(n).is_meta for n in names) for names in self.layer_params)

    def parameter(self, checkpoint_name: str) -> torch.nn.Parameter:
        """The model's parameter for a checkpoint tensor name."""
        return self.model.get_parameter(self.model_name[checkpoint_name])

    def module_path(self, checkpoint_name: str) -> str:
        """The module holding a checkpoint tensor, as the model names it."""
        return self.model_name[checkpoint_name].rsplit(".", 1)[0]

    def elements(self, names: list[str]) -> int:
        """Elements of the named checkpoint tensors, from their headers."""
        return sum(math.prod(self.weights.tensors[n].shape) for n in names)


def check_positions(model: PreTrainedModel, seq_len: int) -> str | None:
    """Check a calibration sequence length against the model's positions, before any work.

    Learned position embeddings (an embedding table of ``max_position_embeddings`` rows beside the token
    embeddings: gpt2, bigcode) have no row for a later position: refused. Rotary or other computed positions
    go on beyond ``max_position_embeddings``, but the model never saw them: a warning.

    Returns:
        The warning's text, or None.

    Raises:
        ConversionError: ``seq_len`` is beyond learned positions.
    """
    import torch

    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or seq_len <= positions:
        return None
    tokens = model.get_input_embeddings()
    learned = any(
        isinstance(m, torch.nn.Embedding) and m is not tokens and m.num_embeddings == positions for m in model.modules()
    )
    if learned:
        raise ConversionError(
            f"--calibration-seq-len {seq_len} is beyond the model's learned positions: the model "
            f"has {positions} positions; give --calibration-seq-len {positions} or less"
        )
    return (
        f"--calibration-seq-len {seq_len} is beyond the {positions} positions the model was trained on "
        "(max_position_embeddings); calibration runs, on positions the model never saw"
    )


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and a layer's worth piles up)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class LayerCall:
    """How the model calls one decoder layer, the hidden states aside: the other positional arguments and the
    keyword arguments (its mask by its attention type, positions, RoPE's cos/sin, ...), as its forward made them.
    The same for every block of one length."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


class Through(tuple):
    """What a stand-in layer returns: ``(hidden,)``. A model that indexes its layer's output (``outputs[0]``) gets
    the hidden states; one that passes the output on whole hands it to the next stand-in, which unwraps it."""


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """(the hidden states, the other positional arguments) of a decoder layer's call."""
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if isinstance(hidden, Through):
        hidden = hidden[0]
    return hidden, tuple(args[1:])


@contextlib.contextmanager
def stood_in(decoders: list[torch.nn.Module], stand_in: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Each decoder layer's forward replaced by ``stand_in(its index)`` inside the block, restored after it."""
    for index, decoder in enumerate(decoders):
        decoder.forward = stand_in(index)
    try:
        yield
    finally:
        for decoder in decoders:
            del decoder.forward


def _stand_ins(
    decoders: list[torch.nn.Module], record: Callable[[int, torch.Tensor, tuple[Any, ...], dict[str, Any]], None]
) -> contextlib.AbstractContextManager[None]:
    """Every decoder layer's forward replaced by one that records its call and passes the hidden states on
    unchanged (the layers are on ``meta``: nothing of theirs runs); the last one stops the model."""

    def stand_in(index: int) -> Callable[..., Through]:
        def forward(*args: Any, **kwargs: Any) -> Through:
            hidden, rest = _hidden_of(args, kwargs)
            record(index, hidden, rest, kwargs)
            if index == len(decoders) - 1:
                raise _Stop
            return Through((hidden,))

        return forward

    return stood_in(decoders, stand_in)


def layer_calls(
    model: PreTrainedModel,
    decoders: list[torch.nn.Module],
    blocks: Iterable[torch.Tensor],
    device: torch.device,
    place: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[list[torch.Tensor], list[LayerCall]]:
    """The hidden states with which the model calls its first decoder layer, per block, and how it calls each
    layer (``LayerCall``), read from the model's own forward: each layer gets the mask of its own attention type
    (sliding, full, chunked), its own RoPE where a family has one per layer type, and whatever else the forward
    computes for it. ``place`` takes each block's first hidden states as they are made (off the device, when
    they wait in CPU memory).

    Raises:
        ConversionError: a layer is called differently from one block to the next (the walk gives every block
            the same arguments), or the model's forward cannot run over the embeddings alone.
    """
    import torch

    firsts: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(decoders)
    last: list[LayerCall | None] = [None] * len(decoders)

    def record(index: int, hidden: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if index == 0:
            firsts.append(place(hidden))
        (calls if calls[index] is None else last)[index] = LayerCall(rest, dict(kwargs))

    with torch.inference_mode(), _stand_ins(decoders, record):
        for block in blocks:
            try:
                model(block.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise ConversionError(
                    f"calibration cannot run the source's layers one at a time: its forward "
                    f"failed between layers ({first_line(exc)}); use --method mean"
                ) from None
    return firsts, _checked_calls(calls, last)


def _checked_calls(firsts: list[LayerCall | None], lasts: list[LayerCall | None]) -> list[LayerCall]:
    """Each layer's call, as the first block made it, where every layer was called and the last block called
    each as the first did (ConversionError otherwise)."""
    checked = []
    for index, (call, other) in enumerate(zip(firsts, lasts)):
        if call is None:
            raise ConversionError(
                f"calibration cannot run the source's layers one at a time: the model never "
                f"called decoder layer {index}; use --method mean"
            )
        if other is not None and not _same(call, other):
            raise ConversionError(
                f"calibration cannot run the source's layers one at a time: decoder layer "
                f"{index} is called with other arguments for other blocks; use --method mean"
            )
        checked.append(call)
    return checked


def _same(a: LayerCall, b: LayerCall) -> bool:
    """Whether two calls are the same: tensors equal in value, everything else equal."""
    import torch

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.shape == y.shape
                and bool(torch.equal(x, y))
            )
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return x is y or bool(x == y)

    return same(a.args, b.args) and same(a.kwargs, b.kwargs)
