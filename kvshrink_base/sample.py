"""Training text written by the original model itself (``python -m uptrain.sample MODEL OUT.jsonl --tokens N``).

Uptraining distils the converted model back to the original; the text it trains on decides where the two are made
to agree. A user's own text recovers that domain (Shakespeare's plays recover Shakespeare, docs/benchmarks.md:
Merge quality), but the model also has to keep working on everything else. Text sampled from the original model
(from its BOS token, at temperature 1, no top-k or top-p) is a draw from the very distribution that is to be
preserved, and needs no dataset. Each sample ends at the model's EOS or after ``--length`` tokens; samples shorter
than ``MIN_TOKENS`` are dropped. The file is one JSON object per line, ``{"text": ...}`` (one document each), and
appears whole or not at all.

This module is the library, in the base because the converter samples its data-free calibration text with it
and uptraining its training text; ``uptrain.sample.cli`` is the command.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvshrink_base.atomic import write_text
from kvshrink_base.device import pick_device
from kvshrink_base.errors import KvshrinkError
from kvshrink_base.generate import with_cache
from kvshrink_base.models import load_model_and_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MIN_TOKENS = 16
SAMPLER = 2  # 2: ``draw`` (1 drew with generate(); the same settings give other text): in cached file names


class SamplingError(KvshrinkError):
    """The model cannot be sampled as asked (it ends every sample at once): one line, exit code 2."""


@dataclass
class Sampling:
    """How much to write and how: ``tokens`` at least, ``batch_size`` samples of at most ``length`` new tokens
    drawn at once (the last batches fewer: ``batch_rows``), at ``temperature``, from ``seed``."""

    tokens: int
    batch_size: int = 64
    length: int = 320
    temperature: float = 1.0
    seed: int = 0

    def file_name(self) -> str:
        """``samples-TOKENS-bBATCH-lLENGTH-tTEMPERATURE-seedSEED-vSAMPLER.jsonl``: every setting that shapes the
        text, and the version of the sampler (``SAMPLER``) that drew it."""
        return (
            f"samples-{self.tokens}-b{self.batch_size}-l{self.length}-t{self.temperature:g}-seed{self.seed}"
            f"-v{SAMPLER}.jsonl"
        )


def samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    how: Sampling,
    progress: Callable[[int], None] | None = None,
) -> Iterator[list[int]]:
    """Token ids of one sample after another (EOS removed) until ``how.tokens`` have been written."""
    import torch

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator_state = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with generator_state, torch.inference_mode():
        torch.manual_seed(how.seed)
        written, drawn, barren = 0, 0, 0
        while written < how.tokens:
            rows = batch_rows(how, written, drawn)
            drawn += rows
            kept = 0
            for row in draw(model, start, rows, how, tokenizer.eos_token_id):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                if len(row) >= MIN_TOKENS:
                    written, kept = written + len(row), kept + 1
                    yield row
            barren = 0 if kept else barren + 1
            if barren == 3:
                raise SamplingError(
                    f"three batches of samples in a row all ended shorter than {MIN_TOKENS} tokens: "
                    "the model ends its text at once (raise --temperature, or check the model)"
                )
            if progress:
                progress(written)


def draw(model: PreTrainedModel, start: int, rows: int, how: Sampling, eos: int | None) -> list[list[int]]:
    """``rows`` samples of at most ``how.length`` tokens after ``start``, each ending at its first ``eos``
    (kept). Not ``generate()``, which reshapes the distribution with whatever the model's generation_config.json
    asks for (Llama 2's top_p 0.9) and draws with ``multinomial`` (an exponential variate for every vocabulary
    entry: a third of the time on a CPU): each token here is one uniform variate through the cumulative
    distribution of softmax(logits / T), each sample's variates the same whoever else is in the batch. A
    sample that ends leaves the batch, and its rows leave the KV cache where the cache can drop them
    (``batch_select_indices``), so the compute goes to the tokens written."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    drawn: list[list[int]]
    cache, going, drawn = DynamicCache(config=model.config), list(range(rows)), [[] for _ in range(rows)]
    through = with_cache(model, cache)
    out = model(input_ids=torch.full((rows, 1), start, device=device), **through, use_cache=True)
    prunable = hasattr(cache, "batch_select_indices")
    for step in range(how.length):
        logits = out.logits[:, -1].float()
        cumulative = torch.softmax(logits if how.temperature == 1 else logits / how.temperature, dim=-1).double()
        cumulative = cumulative.cumsum_(-1)  # in float64: a token of probability 1e-9 keeps its chance
        uniform = torch.rand(rows, 1, dtype=torch.float64, device=device)[going] * cumulative[:, -1:]
        tokens = torch.searchsorted(cumulative, uniform, right=True).clamp_(max=cumulative.shape[-1] - 1)
        for sample, token in zip(going, tokens[:, 0].tolist()):
            if not drawn[sample] or drawn[sample][-1] != eos:  # a sample that ended (unpruned cache) stays ended
                drawn[sample].append(token)
        alive = [i for i, sample in enumerate(going) if drawn[sample][-1] != eos]
        if not alive or step == how.length - 1:
            break
        if prunable and len(alive) < len(going):
            index = torch.tensor(alive, device=device)
            cache.batch_select_indices(index)
            going, tokens = [going[i] for i in alive], tokens[index]
        out = model(input_ids=tokens, **through, use_cache=True)
    return drawn


def batch_rows(how: Sampling, written: int, drawn: int) -> int:
    """Samples to draw next: ``how.batch_size``, or fewer where fewer will do: before any are kept, as many as
    would be needed if each ran its full ``length``; then as many as the tokens written per sample drawn so far
    say (with a quarter to spare). A batch that still falls short is followed by another; none overshoots by
    most of a batch."""
    if not written:
        return max(1, min(how.batch_size, math.ceil(how.tokens / how.length)))
    needed = (how.tokens - written) / (written / drawn)
    return max(1, min(how.batch_size, math.ceil(needed * 1.25)))


def write_samples(
    model_dir: str | Path, out: Path, how: Sampling, device: str = "auto", dtype: str | torch.dtype = "auto"
) -> dict[str, float]:
    """Sample from ``model_dir`` on ``device`` (``kvshrink_base.device.pick_device``'s names; auto: the fastest
    present), its weights in ``dtype`` ("auto": the checkpoint's), into ``out`` (.jsonl); returns {"tokens",
    "documents", "seconds"}. The command checks a user's checkpoint before (``uptrain.sample.cli``).

    Raises:
        DeviceError: ``device`` is not a device, or is absent here.
    """
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, device=pick_device(device))
    started = time.perf_counter()

    def progress(written: int) -> None:
        print(
            f"sample: {written:,} of {how.tokens:,} tokens, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    rows = list(samples(model, tokenizer, how, progress))
    documents = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    tokens = sum(map(len, rows))  # as sampled; the text may tokenize a little differently
    write_text(out, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))
    return {"tokens": tokens, "documents": len(documents), "seconds": round(time.perf_counter() - started, 1)}


def cached_samples(model_dir: str | Path, directory: Path, how: Sampling) -> Path:
    """The samples of ``model_dir`` made as ``how`` says, written into ``directory`` the first time (the benches'
    cache: a rerun reuses them). The file name records every setting, so another setting writes another file; it
    records no model or library version (the demo keys its own samples: ``kvshrink.demo.demo.draw_samples``)."""
    path = directory / how.file_name()
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        done = write_samples(str(model_dir), path, how)
        print(
            f"sampled {done['tokens']:,} tokens ({done['documents']:,} documents) from {model_dir} in "
            f"{done['seconds']:,.0f} s: {path}",
            flush=True,
        )
    return path
