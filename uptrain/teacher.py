"""The offline teacher (``distill.mode: offline``): the teacher's top-k log-probs over the training blocks,
computed once before training one decoder layer at a time, and read back per micro-batch.

The pass is the converter's calibration walk (``convert.onload``, ``convert.walk``): a skeleton of the teacher
whose decoder layers are read from its checkpoint one at a time onto the fastest device present; every block's
hidden states go through one layer before the next is read, waiting in CPU memory where the device is short.
At the end the model's own forward runs once per block with its layers stood in by the stored final hidden
states, so the final norm, the lm_head and whatever the family does after it (softcapping, logit scales) are the
model's code. Each position keeps the ids and log-probs (at the distillation temperature) of its ``top_k`` most
likely tokens and the log of the probability left outside them; ``top_k: null`` keeps every token's.

Files, under ``OUTPUT_DIR/teacher/`` (numpy ``.npy``, memory-mapped when read): ``rows.npy`` (the dataset index
of each row, in the order training takes the blocks), ``logprobs.npy`` (rows, seq_len, k; bfloat16 stored as
uint16, or float32), ``ids.npy`` (int32; absent with ``top_k: null``), ``tail.npy`` (rows, seq_len, float32),
and ``key.json``, written last. The key hashes the teacher checkpoint (its config, and each weight file's name,
size and modification time), the token blocks themselves (data, tokenizer, seq_len and packing all show in
them), k, the temperature and the dtype: files of the same key are reused, another key rebuilds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convert.families import resolve
from convert.onload import LayerLoader, Through, layer_calls, output_head, stood_in
from convert.source import WeightSource, open_weights, read_config
from convert.walk import HiddenStates, hidden
from kvshrink_base.atomic import AtomicDirectory
from kvshrink_base.errors import first_line
from uptrain.errors import RecipeError
from uptrain.loss import Stored

DIRECTORY = "teacher"
KEY_FILE = "key.json"
FORMAT = 1  # bump when the files' layout or meaning changes

Blocks = Callable[[int, int], torch.Tensor]  # blocks(start, stop): rows start..stop-1 of the training blocks, (n, T)
_LayerOutput = Through | tuple[torch.Tensor | None] | torch.Tensor | None  # a stood-in decoder layer's result


def teacher_key(
    teacher: Path, blocks: Blocks, rows: np.ndarray, top_k: int | None, temperature: float, dtype: str
) -> str:
    """The cache key: what the files depend on, hashed (``blocks(start, stop)`` as for ``teacher_pass``)."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "format": FORMAT,
                "top_k": top_k,
                "temperature": temperature,
                "dtype": dtype,
                "config": read_config(teacher),
            },
            sort_keys=True,
        ).encode()
    )
    for path in sorted(teacher.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    for start in range(0, len(rows), 4096):
        digest.update(blocks(start, min(len(rows), start + 4096)).to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:32]


def stored_key(directory: Path) -> str | None:
    """The key of the finished files in ``directory``, or None."""
    try:
        return json.loads((directory / KEY_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _anchors(config: dict[str, Any], weights: WeightSource) -> list[str]:
    """Each decoder layer's Q (or fused QKV) weight as the checkpoint names it (``LayerLoader``'s anchors)."""
    try:
        _, spec = resolve(config)
    except KeyError as exc:
        raise RecipeError(
            f"distill.mode: offline runs the teacher one layer at a time and needs a family the "
            f"converter knows; {exc.args[0]} is not one"
        ) from None
    layers = next(config[k] for k in spec.config.layers if k in config)
    module = spec.tensors.get("q") or spec.tensors["qkv"]
    anchors = []
    for layer in range(layers):
        name = f"{spec.attention.format(layer=layer)}.{module}.weight"
        found = next((n for n in (name, name.split(".", 1)[1]) if n in weights.tensors), None)
        if found is None:
            raise RecipeError(f"the teacher checkpoint has no {name}")
        anchors.append(found)
    return anchors


def _final_states(
    decoders: list[torch.nn.Module], final: list[torch.Tensor | None]
) -> contextlib.AbstractContextManager[None]:
    """The decoder layers stood in by their result: each passes its input on, the last returns ``final[0]`` (a
    block's stored output), so the model's forward goes straight to its final norm and head."""

    def stand_in(index: int) -> Callable[..., _LayerOutput]:
        def forward(*args: Any, **kwargs: Any) -> _LayerOutput:
            received = args[0] if args else kwargs["hidden_states"]
            if index < len(decoders) - 1:
                return Through((received[0] if isinstance(received, Through) else received,))
            # A model that indexes its layers' outputs (``out[0]``) handed on a plain tensor; one that passes
            # them on whole handed on the stand-in's tuple, and reads the last one whole too.
            return (final[0],) if not isinstance(received, Through) and len(decoders) > 1 else final[0]

        return forward

    return stood_in(decoders, stand_in)


def _walk(loader: LayerLoader, blocks: torch.Tensor, device: torch.device, progress: bool) -> list[torch.Tensor]:
    """Every block's final hidden states (the last decoder layer's output), one layer in memory at a time."""
    states = HiddenStates(device, on_device=device.type == "cpu")
    decoders = [loader.model.get_submodule(name) for name in loader.decoders]
    firsts, calls = layer_calls(loader.model, decoders, blocks, device, place=states.keep)
    states.replace(firsts)
    loader.release_resident()
    started = time.perf_counter()
    for layer, call in enumerate(calls):
        decoder = loader.onload(layer)
        states.replace([states.keep(hidden(decoder(block, *call.args, **call.kwargs))) for block in states])
        loader.offload(layer)
        if progress:
            print(f"teacher: layer {layer + 1}/{len(calls)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return states.blocks


def _head_tensors(loader: LayerLoader) -> list[str]:
    head = output_head(loader.model)
    return [n for n in loader.weights.tensors if head and n.startswith(head + ".")]


def _log_probs(
    loader: LayerLoader, blocks: torch.Tensor, finals: list[torch.Tensor], temperature: float, device: torch.device
) -> Iterator[torch.Tensor]:
    """Per block, the model's log-softmax at ``temperature`` (seq_len, vocab) float32, from its own forward with
    the decoder layers stood in by ``finals``."""
    model = loader.model
    loader.materialize(loader.resident + _head_tensors(loader))
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.is_meta:  # tied: the head is the embedding
        head.weight = embeddings.weight
    decoders = [model.get_submodule(name) for name in loader.decoders]
    final: list[torch.Tensor | None] = [None]
    with _final_states(decoders, final):
        for block, state in zip(blocks, finals):
            final[0] = state.to(device)
            logits = model(block.unsqueeze(0).to(device), use_cache=False).logits[0].float()
            yield (logits / temperature).log_softmax(-1)


def group_size(seq_len: int, hidden: int, budget: int = 2 * 10**9) -> int:
    """Blocks walked together: as many as ``budget`` bytes of float32 hidden states hold (the walk keeps every
    block of a group between layers); each group reads the teacher's layers once."""
    return max(1, budget // (seq_len * hidden * 4))


def teacher_pass(
    teacher: Path,
    blocks: Blocks,
    rows: np.ndarray,
    seq_len: int,
    top_k: int | None,
    temperature: float,
    dtype: str,
    out: Path,
    key: str,
    device: torch.device,
    group: int | None = None,
    progress: bool = True,
) -> None:
    """Write the teacher files into ``out`` atomically (see the module): ``blocks(start, stop)`` gives rows
    start..stop-1 of the training blocks as a (n, seq_len) tensor, ``rows`` their dataset indices."""
    weights = open_weights(teacher)
    config = read_config(teacher)
    run = torch.float32 if device.type == "cpu" else torch.bfloat16
    loader = LayerLoader(teacher, weights, _anchors(config, weights), device, run)
    count, vocab = len(rows), loader.model.config.vocab_size
    k = vocab if top_k is None else min(top_k, vocab)
    group = group or group_size(seq_len, loader.model.config.hidden_size)
    started = time.perf_counter()
    with torch.inference_mode(), AtomicDirectory(out) as tmp:
        store = np.uint16 if dtype == "bfloat16" else np.float32
        logprobs = np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", store, (count, seq_len, k))
        ids = None if top_k is None else np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (count, seq_len, k))
        tail = np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float32, (count, seq_len))
        for start in range(0, count, group):
            chunk = blocks(start, min(count, start + group))
            if progress:
                print(f"teacher: blocks {start + 1}-{start + len(chunk)} of {count}", flush=True)
            if start:
                loader.materialize(loader.resident)
            finals = _walk(loader, chunk, device, progress)
            for i, log_p in enumerate(_log_probs(loader, chunk, finals, temperature, device), start):
                _store_row(log_p, k, top_k is None, dtype, (logprobs, ids, tail), i)
            loader.release_resident()
        for array in (logprobs, ids, tail):
            if array is not None:
                array.flush()
        np.save(tmp / "rows.npy", rows.astype(np.int64))
        meta = {"key": key, "rows": count, "seq_len": seq_len, "top_k": top_k, "temperature": temperature}
        (tmp / KEY_FILE).write_text(json.dumps({**meta, "dtype": dtype}) + "\n")
        written = sum(p.stat().st_size for p in tmp.iterdir())
    if progress:
        print(
            f"teacher: {count} blocks of {seq_len} tokens, top {k} of {vocab} tokens, {written / 1e6:,.1f} MB "
            f"written to {out} in {time.perf_counter() - started:.1f} s",
            flush=True,
        )


def _store_row(
    log_p: torch.Tensor,
    k: int,
    whole: bool,
    dtype: str,
    arrays: tuple[np.ndarray, np.ndarray | None, np.ndarray],
    row: int,
) -> None:
    """One block's (seq_len, vocab) log-probs into the files (``arrays``: logprobs, ids (None when ``whole``),
    tail): the top k (or all), and the mass outside them."""
    logprobs, ids, tail = arrays
    if whole:
        values, rest = log_p, torch.full(log_p.shape[:1], float("-inf"))
    else:
        assert ids is not None, "top-k files keep the ids"
        values, index = log_p.topk(k, dim=-1)
        ids[row] = index.to(torch.int32).cpu().numpy()
        rest = log_p.scatter(-1, index, float("-inf")).logsumexp(-1)
    values = values.to(torch.bfloat16).view(torch.uint16) if dtype == "bfloat16" else values
    logprobs[row] = values.cpu().numpy()
    tail[row] = rest.cpu().numpy()


class TeacherFiles:
    """The stored teacher distribution of every training block, memory-mapped; ``targets`` reads a batch's."""

    def __init__(self, directory: Path, key: str):
        self.directory, self.key = directory, key
        try:
            meta = json.loads((directory / KEY_FILE).read_text())
            rows = np.load(directory / "rows.npy")
            self.logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")
            self.tail = np.load(directory / "tail.npy", mmap_mode="r")
            self.ids = np.load(directory / "ids.npy", mmap_mode="r") if meta["top_k"] is not None else None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise RecipeError(
                f"the teacher files in {directory} are damaged ({first_line(exc)}); remove "
                "that directory to compute them again"
            ) from None
        shapes = {self.logprobs.shape[:2], self.tail.shape} | ({self.ids.shape[:2]} if self.ids is not None else set())
        if meta.get("key") != key or len(shapes) != 1 or self.tail.shape[0] != len(rows):
            raise RecipeError(
                f"the teacher files in {directory} do not match their key.json; remove that "
                "directory to compute them again"
            )
        self.bfloat16 = meta["dtype"] == "bfloat16"
        self.row_of = {int(index): row for row, index in enumerate(rows)}

    def targets(self, indices: torch.Tensor, device: torch.device) -> Stored:
        """The stored distribution of the blocks at these dataset indices, flattened to (blocks x seq_len, ...)."""
        try:
            rows = [self.row_of[int(i)] for i in indices]
        except KeyError as exc:
            raise RecipeError(
                f"the teacher files hold no block {exc.args[0]} of the training data; remove "
                f"{self.directory} to compute them again"
            ) from None
        logprobs = torch.from_numpy(np.stack([self.logprobs[r] for r in rows]))
        logprobs = logprobs.view(torch.bfloat16).float() if self.bfloat16 else logprobs
        tail = torch.from_numpy(np.stack([self.tail[r] for r in rows]))
        # Rounded to bfloat16, the k probabilities and the tail no longer sum to 1; a target that does not would
        # give the student's logits a gradient that does not sum to 0, which the head turns into a spurious
        # push on the hidden states. Normalized here (a no-op to float32 rounding for float32 files).
        norm = torch.logaddexp(logprobs.logsumexp(-1), tail)
        logprobs, tail = logprobs - norm[..., None], tail - norm
        ids = None if self.ids is None else torch.from_numpy(np.stack([self.ids[r] for r in rows])).long()
        return Stored(
            None if ids is None else ids.flatten(0, 1).to(device),
            logprobs.flatten(0, 1).to(device),
            tail.flatten(0, 1).to(device),
        )
