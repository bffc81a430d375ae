"""Decoding measured in stock transformers: cache bytes, time per token, attention path, largest batch.

Every model runs as transformers ships it: ``DynamicCache``, ``attn_implementation="sdpa"``, a manual greedy
loop (one token per forward through the KV cache) under ``torch.inference_mode``. Running out of
memory marks a cell "OOM" instead of ending the run. The device is a name ``kvshrink_base.device.pick_device`` chose
(``cpu``, ``cuda``, ``cuda:N``, ``mps``); CUDA's allocator statistics are read on that device.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from kvshrink_base.generate import with_cache
from uptrain.decoding import DecodeError

if TYPE_CHECKING:
    from transformers import Cache, DynamicCache, PreTrainedModel, StaticCache

GB = 1e9
MAX_FIT_BATCH = 1 << 16
_Result = TypeVar("_Result")
# What one decode step calls: the model itself, or its forward under torch.compile (``decode_step``); either
# returns the model's output, typed as torch types a module's call.
Step = Callable[..., Any]


@dataclass
class Model:
    """A loaded model under test and what the tables say about it."""

    name: str
    model: PreTrainedModel
    kv_heads: int
    heads: int
    weight_bytes: int
    path: Path | None = None  # its checkpoint directory, where its tokenizer is (the twin: the original's)
    attention: str = ""
    compiled: Step | None = None  # torch.compile of model.forward, made on first use (--static-cache compile)


@dataclass
class Cell:
    """One row of results.csv: a model at one (batch, context)."""

    model: str
    kv_heads: int
    batch: int
    context: int
    status: str = "ok"  # ok | OOM | skipped: why
    cache_bytes: int = 0
    cache_ratio: float = 0.0  # this model's cache / the first model's, same cell
    ms_per_step: float = 0.0  # median time of one decode step (the whole batch)
    tokens_per_s: float = 0.0  # median over repeats
    tokens_per_s_min: float = 0.0
    tokens_per_s_max: float = 0.0
    speedup: float = 0.0  # this model's median tokens/s / the first model's, same cell
    peak_bytes: int = 0  # CUDA only: max_memory_allocated (weights + cache + activations)
    times: list[float] = field(default_factory=list, repr=False)  # seconds per repeat


def describe(name: str, model: PreTrainedModel, path: Path | None) -> Model:
    """Wrap a loaded model with the numbers the tables need."""
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    weights = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    return Model(name, model.eval(), kv_heads, heads, weights, path)


def is_cuda(device: str) -> bool:
    """Whether ``device`` (``cuda``, ``cuda:1``, ...) is a CUDA device: peak memory is measured there."""
    return torch.device(device).type == "cuda"


@contextlib.contextmanager
def on_device(m: Model, device: str) -> Iterator[PreTrainedModel]:
    """The model on `device` for the block; on CUDA only one model is resident at a time."""
    m.model.to(device)  # type: ignore[arg-type]  # functools.wraps gives .to the unbound Module.to signature
    try:
        yield m.model
    finally:
        if device != "cpu":
            m.model.to("cpu")  # type: ignore[arg-type]  # as above
            empty_cache(device)


def sync(device: str) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously): before a clock is read."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def empty_cache(device: str) -> None:
    """Free what Python and the device's caching allocator hold unused."""
    gc.collect()
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.empty_cache()
    elif kind == "mps":
        torch.mps.empty_cache()


def guarded(fn: Callable[[], _Result], device: str) -> _Result | None:
    """fn(), or None when memory runs out: the cell is reported as OOM instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        pass
    except (RuntimeError, MemoryError) as exc:
        if "out of memory" not in str(exc) and "can't allocate memory" not in str(exc):
            raise
    empty_cache(device)  # outside the except block, so the traceback's frames (and tensors) are gone
    return None


def cache_bytes(cache: Cache) -> int:
    """Bytes of every layer's key and value tensors held by a transformers 5 Cache (``cache.layers``).

    transformers types ``Cache.layers`` as attention, linear-attention or placeholder layers; the caches measured
    here hold attention layers only (keys and values, set together), which the type checker is told where this
    module reads them (here, ``rewind``, ``to_static``).
    """
    # attention layers only (see above); sum() is lost in the declared union's types
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)  # type: ignore[union-attr, misc]


def prefill(model: PreTrainedModel, batch: int, context: int, prefill_tokens: int) -> tuple[DynamicCache, torch.Tensor]:
    """Random prompts of `context` tokens into a fresh DynamicCache; returns (cache, next ids (batch, 1)).

    `rows` distinct prompts (the largest divisor of batch with rows * context <= prefill_tokens, at least 1)
    go through the model; the cache is then repeated to `batch` rows: the shapes and bytes of a full prefill,
    while prefill activations stay those of `rows` sequences, as when a server prefills a few at a time.
    """
    from transformers import DynamicCache

    rows = max([d for d in range(1, batch + 1) if batch % d == 0 and d * context <= prefill_tokens] or [1])
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (rows, context), device=device)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        logits = out.logits  # (rows, 1, V)
    if batch > rows:
        cache.batch_repeat_interleave(batch // rows)  # (rows, kv, T, d) -> (batch, kv, T, d) in every layer
    return cache, logits[:, -1:].argmax(-1).repeat_interleave(batch // rows, dim=0)  # (batch, 1)


def decode(model: Step, cache: Cache, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps through the cache, one token each; returns the last ids (batch, 1)."""
    through = with_cache(model, cache)
    with torch.inference_mode():
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()  # a compiled step's outputs may be overwritten next step
            logits = model(input_ids=ids, **through, use_cache=True).logits  # (batch, 1, vocab)
            ids = logits[:, -1:].argmax(-1)  # (batch, 1)
    return ids


def timed_decode(model: Step, cache: Cache, ids: torch.Tensor, steps: int, device: str) -> float:
    """Seconds for `steps` decode steps; the cache is rewound afterwards for the next repeat."""
    sync(device)
    start = time.perf_counter()
    decode(model, cache, ids, steps)
    sync(device)
    seconds = time.perf_counter() - start
    rewind(cache, steps)
    return seconds


def rewind(cache: Cache, steps: int) -> None:
    """Forget the last `steps` tokens: a DynamicCache is cropped, a StaticCache's write position moved back."""
    if not hasattr(cache.layers[0], "cumulative_length"):
        cache.crop(-steps)
        return
    for layer in cache.layers:
        # in place: compiled graphs hold its address; a StaticLayer's, a tensor (attention layers only: cache_bytes)
        layer.cumulative_length.sub_(steps)  # type: ignore[union-attr]


def to_static(model: PreTrainedModel, cache: DynamicCache, room: int) -> StaticCache:
    """The prefilled DynamicCache copied into a StaticCache of `context + room` positions (then dropped).

    Positions past the written ones are masked, but a static cache's attention still spans all of them,
    as in transformers' own compiled generation.
    """
    from transformers import StaticCache

    context = cache.get_seq_length()
    static = StaticCache(config=model.config, max_cache_len=context + room)
    if not hasattr(static.layers[0], "cumulative_length"):
        raise DecodeError("--static-cache needs transformers 5 (StaticLayer.cumulative_length)")
    for layer, filled in zip(static.layers, cache.layers):
        # allocates (batch, kv_heads, context + room, head_dim); attention layers only (cache_bytes)
        layer.update(filled.keys, filled.values)  # type: ignore[union-attr, arg-type]
    return static


def decode_step(m: Model, mode: str) -> Step:
    """What one decode step calls: the model, or (mode "compile") its forward under torch.compile.

    "compile" uses mode="reduce-overhead" (CUDA graphs on CUDA), one graph per (batch, cache length).
    """
    if mode != "compile":
        return m.model
    if m.compiled is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        m.compiled = torch.compile(m.model.forward, mode="reduce-overhead", dynamic=False)
    return m.compiled


def max_positions(model: PreTrainedModel) -> int:
    """The positions the model's config allows (no limit where it names none)."""
    return getattr(model.config, "max_position_embeddings", None) or sys.maxsize


def measure_cell(models: list[Model], batch: int, context: int, args: argparse.Namespace) -> list[Cell]:
    """One grid cell for every model, with cache and speed ratios to the first model.

    On CPU the models take turns within each repeat (a drifting load on shared cores falls on all alike);
    on CUDA one model at a time, so each has the whole memory.
    """
    groups = [models] if args.device == "cpu" else [[m] for m in models]
    cells: dict[str, Cell] = {}
    for group in groups:
        with contextlib.ExitStack() as stack:
            for m in group:
                stack.enter_context(on_device(m, args.device))
            cells.update(measure_group(group, batch, context, args))
    first = cells[models[0].name]
    for cell in cells.values():
        if cell.status == "ok" and first.status == "ok":
            cell.cache_ratio = cell.cache_bytes / first.cache_bytes
            cell.speedup = cell.tokens_per_s / first.tokens_per_s
    return [cells[m.name] for m in models]


def measure_group(group: list[Model], batch: int, context: int, args: argparse.Namespace) -> dict[str, Cell]:
    """Prefill every model of the group, warm up, then time `repeats` rounds; caches freed at the end."""
    cells = {m.name: Cell(m.name, m.kv_heads, batch, context) for m in group}
    live: dict[str, tuple[Step, Cache, torch.Tensor]] = {}
    for m in group:
        limit = max_positions(m.model)
        if context + args.warmup + args.new_tokens > limit:
            cells[m.name].status = f"skipped: beyond {limit} positions"
        elif (state := guarded(partial(start_cell, m, cells[m.name], args), args.device)) is None:
            cells[m.name].status = "OOM"
        else:
            live[m.name] = state  # (model, cache, ids)
    for _ in range(args.repeats):
        for name in list(live):
            seconds = guarded(partial(timed_decode, *live[name], args.new_tokens, args.device), args.device)
            if seconds is None:
                cells[name].status = "OOM"
                del live[name]
            else:
                cells[name].times.append(seconds)
    for name in live:
        summarize(cells[name], args.new_tokens)
        if is_cuda(args.device):
            cells[name].peak_bytes = torch.cuda.max_memory_allocated(args.device)
    live.clear()
    empty_cache(args.device)
    return cells


def start_cell(m: Model, cell: Cell, args: argparse.Namespace) -> tuple[Step, Cache, torch.Tensor]:
    """Prefill, record the cache bytes, run the warm-up steps; returns (model, cache, ids) for timing."""
    if is_cuda(args.device):
        torch.cuda.reset_peak_memory_stats(args.device)
    dynamic, ids = prefill(m.model, cell.batch, cell.context, args.prefill_tokens)
    cell.cache_bytes = cache_bytes(dynamic)  # read before any decode step grows it
    mode = getattr(args, "static_cache", "off")
    cache: Cache = dynamic
    if mode != "off":
        cache = to_static(m.model, dynamic, args.warmup + args.new_tokens)
        if is_cuda(args.device):  # peak: weights, the static cache and decode activations, not the copy
            empty_cache(args.device)
            torch.cuda.reset_peak_memory_stats(args.device)
    step = decode_step(m, mode)
    timed_decode(step, cache, ids, args.warmup, args.device)
    return step, cache, ids


def summarize(cell: Cell, new_tokens: int) -> None:
    """Median and spread of the repeats' throughput (tokens/s = batch * new_tokens / seconds)."""
    rates = [cell.batch * new_tokens / s for s in cell.times]
    cell.tokens_per_s = statistics.median(rates)
    cell.tokens_per_s_min, cell.tokens_per_s_max = min(rates), max(rates)
    cell.ms_per_step = 1000 * statistics.median(cell.times) / new_tokens


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: torch's profiler prints start/stop lines there from C++."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def attention_path(m: Model, device: str) -> str:
    """Which kernel one decode step's attention runs, and whether K/V reach it expanded to every query head.

    Observed, not assumed: torch's SDPA entry point is wrapped to see the heads transformers hands it, and the
    profiler names the kernel and any repeat_interleave (which a kernel without grouped-query support adds).
    """
    real = F.scaled_dot_product_attention
    seen: list[tuple[int, int, bool]] = []  # (query heads, K/V heads, enable_gqa) of each call

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((query.shape[1], key.shape[1], bool(kwargs.get("enable_gqa", False))))
        return real(query, key, value, *args, **kwargs)

    with on_device(m, device) as model:
        cache, ids = prefill(model, 1, 8, 8)
        F.scaled_dot_product_attention = spy
        try:
            with quiet_stderr(), torch.autograd.profiler.profile() as prof:
                decode(model, cache, ids, 1)
        finally:
            F.scaled_dot_product_attention = real
    ops = [e.key for e in prof.key_averages()]
    kernel = next((op for op in ops if "attention" in op and op != "aten::scaled_dot_product_attention"), "?")
    if not seen:
        return f"{m.model.config._attn_implementation}: torch SDPA not called ({kernel})"
    q_heads, k_heads, gqa = seen[0]
    path = f"sdpa -> {kernel}, query {q_heads} heads, K/V {k_heads} heads"
    if m.kv_heads == m.heads:
        return f"{path}; MHA, nothing to expand"
    if k_heads == m.heads:
        return f"{path}; transformers' repeat_kv EXPANDS K/V to all {m.heads} query heads before the kernel"
    if gqa and "aten::repeat_interleave" in ops:
        return f"{path} (enable_gqa=True); the kernel EXPANDS K/V to all heads (repeat_interleave)"
    how = "enable_gqa=True" if gqa else f"query folded onto the {k_heads} KV heads (pack_gqa)"
    return f"{path} ({how}); K/V NOT expanded: each step reads the {m.kv_heads}-head cache as it is"


def memory_budget(args: argparse.Namespace) -> float:
    """Bytes: --memory-budget, else the device's total memory (MPS: the machine's, which it shares)."""
    if args.memory_budget is not None:
        return args.memory_budget * GB
    if is_cuda(args.device):
        return float(torch.cuda.get_device_properties(args.device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fits(m: Model, batch: int, args: argparse.Namespace) -> int | None:
    """Peak bytes of prefill + 2 decode steps at (batch, fit-context) on CUDA, or None when it runs out."""
    torch.cuda.reset_peak_memory_stats(args.device)

    def run() -> int:
        cache, ids = prefill(m.model, batch, args.fit_context, args.prefill_tokens)
        decode(m.model, cache, ids, 2)
        sync(args.device)
        return torch.cuda.max_memory_allocated(args.device)

    peak = guarded(run, args.device)
    empty_cache(args.device)
    return peak


def largest_batch_measured(m: Model, budget: float, args: argparse.Namespace) -> tuple[int, int]:
    """(largest batch, its peak bytes) with the CUDA allocator capped at `budget`: doubling, then bisection."""
    total = torch.cuda.get_device_properties(args.device).total_memory
    index = torch.device(args.device).index  # None ("cuda"): the current device, which "cuda" is
    with on_device(m, args.device):
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
        try:
            good, peak, bad = 0, 0, 1
            while bad <= MAX_FIT_BATCH and (p := fits(m, bad, args)) is not None:
                good, peak, bad = bad, p, bad * 2
            while good < MAX_FIT_BATCH and bad - good > 1:
                mid = (good + bad) // 2
                if (p := fits(m, mid, args)) is not None:
                    good, peak = mid, p
                else:
                    bad = mid
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
    return good, peak


def largest_batches(
    models: list[Model], cells: list[Cell], args: argparse.Namespace
) -> list[dict[str, str | int | float]]:
    """fit.csv rows: measured on CUDA; elsewhere computed as (budget - weights) / measured cache per sequence."""
    budget, rows = memory_budget(args), []
    for m in models:
        row: dict[str, str | int | float] = dict(
            model=m.name,
            kv_heads=m.kv_heads,
            context=args.fit_context,
            budget_gb=round(budget / GB, 2),
            weights_gb=round(m.weight_bytes / GB, 3),
        )
        if is_cuda(args.device):
            batch, peak = largest_batch_measured(m, budget, args)
            row.update(largest_batch=batch, how=f"measured (peak {peak / GB:.2f} GB)")
        else:
            ok = [c for c in cells if c.model == m.name and c.status == "ok"]
            if not ok:
                continue
            per_seq = ok[0].cache_bytes / (ok[0].batch * ok[0].context) * args.fit_context
            row.update(
                largest_batch=int((budget - m.weight_bytes) // per_seq),
                how=f"computed, not measured: (budget - weights) / {per_seq / 1e6:.1f} MB cache per sequence",
            )
        rows.append(row)
    return rows
