"""Calibration: the source runs on real text one decoder layer at a time, and each layer is converted as it goes.

The text is the user's (``--calibration-data``) or, without it, sampled from the source itself
(``sampled_documents``: the whole model runs, so it must fit in memory; else one line says to give text).
The source model is a skeleton whose layers are read from its checkpoint one at a time
(``convert.onload.LayerLoader``). The walk (``calibrate_layers``) starts from the embeddings' output for every
calibration block and, for each layer l:

- measures C = Σ [x, 1][x, 1]ᵀ (float64) of the input x of layer l's Q (or fused QKV) projection;
- rewrites layer l with it (``convert.layers.rewrite``) and spills the final tensors, in the output dtype,
  to a file beside the output (``convert.layers.Spill``), where the writer takes them;
- passes the blocks on to layer l + 1: through the original layer (``parallel`` order: every layer is fitted
  to the original model's activations) or through the converted one (``sequential``: as GPTQ does, layer l + 1
  is fitted to the inputs the converted model will give it; each layer then runs twice, three times with the
  O refit; ``convert.refine`` holds the refinements).

Memory: one decoder layer, the embeddings and the hidden states (``convert.device``: the formula), whatever
the depth of the model. Progress (``progress=True``): a line on stderr per stage and per layer.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert.device import MemoryEstimate, available_ram, estimate, free_bytes, hidden_on_device, run_dtype
from convert.errors import ConversionError
from convert.head_form import LayerHeads
from convert.layers import LayerPlan, LayerState, output_tensors, rewrite
from convert.onload import LayerLoader, layer_calls
from convert.options import ConvertOptions
from convert.refine import AttentionIO, refine, refit_o
from convert.source import WeightSource, torch_dtype
from convert.stages import Stages
from convert.walk import HiddenStates, Hook, Walk
from kvshrink_base.device import pick_device
from kvshrink_base.errors import first_line
from kvshrink_base.models import load_model
from kvshrink_base.text import DataError, read_documents

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

SAMPLE_LENGTH = 320  # tokens per sample drawn from the source (kvshrink_base.sample's default)
Moments = list["torch.Tensor | None"]  # per hooked module, Σ [x, 1][x, 1]ᵀ (float64) so far


def say(enabled: bool, text: str) -> None:
    """One progress line on stderr."""
    if enabled:
        print(f"calibration: {text}", file=sys.stderr, flush=True)


def read_text(files: list[str], tokens: int) -> list[str]:
    """The calibration documents: the project's one text reader (``kvshrink_base.text``, the formats training takes),
    read until a generous bound of characters for ``tokens`` tokens."""
    try:
        return read_documents(files, "text", max_chars=tokens * 16)
    except DataError as exc:
        raise ConversionError(f"--calibration-data: {exc}") from None


def load_tokenizer(source: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        reason = first_line(exc)
        raise ConversionError(f"calibration needs the source's tokenizer, which {source} lacks ({reason})") from None


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], tokens: int, seq_len: int, bos: bool = False
) -> torch.Tensor:
    """Documents tokenized, joined with EOS, cut into (n, seq_len) blocks of at most ``tokens`` in all.

    With ``bos`` every block starts with the tokenizer's BOS where it has one, as many models saw sequences
    start in training; the text fills the rest of the block. Off by default: the first position's activations
    (an attention sink) are unlike any other's and weigh heavily in the moments, and on SmolLM2-135M-Instruct,
    whose BOS is its chat-turn token, the recommended conversion came out worse with it (docs/benchmarks.md).
    """
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        for start in range(0, len(document), 200_000):  # chunks: the tokenizer need not see a whole book
            ids += tokenizer(document[start : start + 200_000], add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                break
        if eos is not None:
            ids.append(eos)
        if len(ids) >= tokens:
            break
    seq_len = min(seq_len, tokens)
    head = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None and seq_len > 1 else []
    body = seq_len - len(head)
    if len(ids) < body:
        raise ConversionError(
            f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len} "
            "(--calibration-seq-len); give more text or a smaller --calibration-seq-len"
        )
    n = min(tokens // seq_len, len(ids) // body)
    text = torch.tensor(ids[: n * body]).reshape(n, body)
    return torch.cat([torch.tensor(head, dtype=text.dtype).expand(n, len(head)), text], dim=1)


def layer_dtype(weights: WeightSource, plan: LayerPlan, device: torch.device) -> torch.dtype:
    """The dtype the decoder layers run in on ``device`` (``convert.device.run_dtype`` of the layers' own)."""
    return run_dtype(device, torch_dtype(weights.tensors[plan.source_names[plan.anchors[0]]].dtype))


def model_dtype(weights: WeightSource, device: torch.device) -> torch.dtype:
    """The dtype the whole source model runs in on ``device`` (sampling)."""
    return run_dtype(device, torch_dtype(next(iter(weights.tensors.values())).dtype))


def sampling_bytes(weights: WeightSource, device: torch.device) -> int:
    """Memory for sampling text from the whole source model on ``device``: its weights in the run dtype, plus a
    fifth for activations and the cache."""
    elements = sum(info.nbytes // max(1, torch_dtype(info.dtype).itemsize) for info in weights.tensors.values())
    return int(elements * model_dtype(weights, device).itemsize * 1.2)


def check_model_fits(weights: WeightSource, device: torch.device) -> None:
    """Sampling runs the whole source model: refuse, before any work, where it cannot fit."""
    dtype = model_dtype(weights, device)
    needed = sampling_bytes(weights, device)
    free = free_bytes(device) if device.type != "cpu" else available_ram()  # tests stand in for available_ram
    if needed > free:
        raise ConversionError(
            f"sampling calibration text runs the whole source model ({needed / 1e9:.1f} GB in "
            f"{str(dtype).removeprefix('torch.')} on {device}), more than the "
            f"{free / 1e9:.1f} GB free; give text with --calibration-data FILE"
        )


def sampled_documents(source: Path, weights: WeightSource, tokens: int, device_name: str, progress: bool) -> list[str]:
    """Text sampled from the source itself (``kvshrink_base.sample``, from BOS at temperature 1): ``tokens`` of it."""
    import torch

    from kvshrink_base.sample import Sampling, samples

    device = pick_device(device_name)
    check_model_fits(weights, device)
    tokenizer = load_tokenizer(source)
    dtype = model_dtype(weights, device)
    say(progress, f"sampling {tokens:,} tokens of calibration text from {source} on {device}")
    model = load_model(source, dtype=dtype, device=device)
    documents = tokenizer.batch_decode(list(samples(model, tokenizer, Sampling(tokens, length=SAMPLE_LENGTH))))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return documents


def moment_hook(moments: Moments, index: int, stages: Stages | None = None) -> Hook:
    """A forward pre-hook adding [x, 1][x, 1]ᵀ of its module's input to ``moments[index]``: each block's moment
    in float32 where the input is (an accelerator's fast matmul), summed in float64 on the CPU."""
    import torch

    def add(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        with stages.timed("moments") if stages is not None else contextlib.nullcontext():
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # [x, 1]: biases fold in
            moment = (x.T @ x).to("cpu", torch.float64)
            before = moments[index]
            moments[index] = moment if before is None else before + moment

    return add


def calibrate_layers(
    src_dir: Path,
    weights: WeightSource,
    plan: LayerPlan,
    state: LayerState,
    load: Callable[[str], torch.Tensor],
    blocks: torch.Tensor,
    options: ConvertOptions,
    progress: bool = False,
) -> dict[str, Any]:
    """Walk the decoder layers over the calibration blocks, converting and spilling each (``state.spill``).

    Args:
        blocks: the calibration token blocks, (n, seq_len).
        options: the conversion's options: the device, the calibration order, the O refit and the local steps.

    Returns:
        {"tokens": n, "seconds": s, "device": ..., "peak_layers": the most layers ever materialized at once,
        "stages": seconds per stage over all layers}.
    """
    import torch

    started = time.perf_counter()
    device = pick_device(options.device)
    loader, walk = open_walk(src_dir, weights, plan, state, load, blocks, options, device)
    say(
        progress,
        f"{blocks.shape[0]} sequences of {blocks.shape[1]} tokens through {plan.dims.layers} layers "
        f"on {device} in {str(loader.dtype).removeprefix('torch.')}, hidden states "
        f"{'in CPU memory, moved per block' if not walk.states.on_device else 'on ' + str(device)}",
    )
    step = _sequential_layer if options.calibration_order == "sequential" else _parallel_layer
    stages, spill = walk.stages, state.spill
    if spill is None:
        raise ValueError("calibrate_layers needs state.spill, where the converted layers go")
    with torch.inference_mode():
        for layer in range(plan.dims.layers):
            with stages.timed("read"):
                decoder = loader.onload(layer)
            new, has_bias, note = step(walk, layer, decoder, options)
            with stages.timed("write"):
                spill.put(layer, output_tensors(plan, layer, new, has_bias))
            with stages.timed("read"):
                loader.offload(layer)
            say(
                progress,
                f"layer {layer + 1}/{plan.dims.layers} ({time.perf_counter() - started:.0f} s{note}; "
                f"{stages.end_layer()})",
            )
    seconds = round(time.perf_counter() - started, 2)
    return {
        "tokens": blocks.numel(),
        "seconds": seconds,
        "device": str(device),
        "peak_layers": loader.peak_layers,
        "stages": {name: round(value, 2) for name, value in stages.total.items()},
    }


def open_walk(
    src_dir: Path,
    weights: WeightSource,
    plan: LayerPlan,
    state: LayerState,
    load: Callable[[str], torch.Tensor],
    blocks: torch.Tensor,
    options: ConvertOptions,
    device: torch.device,
    hidden_limit: int | None = None,
) -> tuple[LayerLoader, Walk]:
    """The loader with its skeleton, and the walk holding the first layer's inputs for every block and how the
    model calls each layer. ``hidden_limit`` (bytes) replaces the free memory measured (tests force the offload)."""
    dtype = layer_dtype(weights, plan, device)
    loader = LayerLoader(src_dir, weights, [plan.source_names[a] for a in plan.anchors], device, dtype)
    memory = memory_estimate(loader, plan, blocks.numel(), options, device, hidden_limit=hidden_limit)
    states = HiddenStates(device, memory.on_device)
    decoders = [loader.model.get_submodule(name) for name in loader.decoders]
    firsts, calls = layer_calls(loader.model, decoders, blocks, device, place=states.keep)
    states.replace(firsts)
    loader.release_resident()  # the embeddings have made every layer's inputs that will ever be needed
    walk = Walk(loader, plan, state, load, states, calls, seed=plan.seed, stages=Stages(device))
    return loader, walk


def memory_estimate(
    loader: LayerLoader,
    plan: LayerPlan,
    tokens: int,
    options: ConvertOptions,
    device: torch.device,
    sampled: bool = False,
    hidden_limit: int | None = None,
) -> MemoryEstimate:
    """``convert.device.estimate`` for this model (its largest decoder layer, its resident parameters, the whole
    model where text is sampled from it first) and the options' calibration settings, with the hidden states'
    placement the walk will choose (``hidden_limit``, bytes, replaces the free memory measured)."""
    weights = loader.weights
    names = max(loader.layer_tensors, key=loader.elements)
    attention = max(
        loader.elements([plan.source_names[n] for n in members.values()]) for members in plan.sources.values()
    )
    memory = estimate(
        loader.elements(names),
        loader.elements(loader.resident),
        attention,
        tokens,
        plan.dims,
        device,
        loader.dtype,
        refit_o=options.refit_o,
        local_steps=options.local_steps,
        seq_len=min(options.calibration_seq_len, tokens),
        read_bytes=sum(weights.tensors[n].nbytes for n in names),
        fused_elements=loader.elements([n for n in names if n not in loader.model_name]),
        sampling_bytes=sampling_bytes(weights, device) if sampled else 0,
    )
    if device.type != "cpu" or hidden_limit is not None:  # on the CPU the device is CPU memory
        memory.on_device = hidden_on_device(device, int(memory.hidden * memory.copies), hidden_limit)
    return memory


def _q_path(walk: Walk, layer: int) -> str:
    return walk.path(walk.plan.anchors[layer])


def _parallel_layer(
    walk: Walk, layer: int, decoder: torch.nn.Module, options: ConvertOptions
) -> tuple[LayerHeads, bool, str]:
    """Measure the layer's moment on the original model's activations, pass them on through the original layer."""
    moments: Moments = [None]
    outputs = walk.run(layer, decoder, {_q_path(walk, layer): moment_hook(moments, 0, walk.stages)}, keep=True)
    walk.states.replace(outputs)
    with walk.stages.timed("fits"):
        new, has_bias = rewrite(walk.plan, walk.state, walk.load, layer, moments[0])
    return new, has_bias, ""


def _sequential_layer(
    walk: Walk, layer: int, decoder: torch.nn.Module, options: ConvertOptions
) -> tuple[LayerHeads, bool, str]:
    """Measure, convert, refine the layer on the converted layers' outputs; pass them on through the converted one."""
    plan, keep = walk.plan, walk.states.keep
    moments: Moments = [None]
    hooks: dict[str, Hook] = {_q_path(walk, layer): moment_hook(moments, 0, walk.stages)}
    heads_out: list[torch.Tensor] = []  # the original heads' outputs (o_proj's input), for the refit
    if options.refit_o:
        hooks[walk.path(plan.sources[layer]["o", "weight"])] = lambda _m, args: heads_out.append(keep(args[0].detach()))
    attention = (
        AttentionIO(walk.loader.model.get_submodule(walk.attention_path(layer)), keep) if options.local_steps else None
    )
    walk.run(layer, decoder, hooks, keep=False)
    if attention is not None:
        attention.remove()  # the original layer's calls only
    with walk.stages.timed("fits"):
        new, has_bias = rewrite(plan, walk.state, walk.load, layer, moments[0])
        walk.write_converted(layer, new, has_bias)
    if options.refit_o:
        with walk.stages.timed("refit"):
            new = refit_o(walk, layer, decoder, heads_out, new)
    note = ""
    if attention is not None:
        with walk.stages.timed("local"):
            first, last, better = refine(walk, layer, options.local_steps, attention.seen, new, has_bias)
            note = f", local relative error {first:.4f} -> {last:.4f}"
            if better is not None:
                new = better
                walk.write_converted(layer, new, has_bias)
    walk.states.replace(walk.run(layer, decoder, {}, keep=True))
    return new, has_bias, note
