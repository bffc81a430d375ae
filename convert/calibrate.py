"""Calibration for ``--method svd``: the second moment of every layer's attention input on real text.

The source model runs in transformers on the calibration text; a forward pre-hook on each layer's
Q (or fused QKV) projection adds xxᵀ of its input, for x = [attention input, 1], in float64.

Memory: the model itself (on CPU in float32; on a GPU in its own dtype, with accelerate's
``device_map="auto"`` placing what does not fit on CPU, then disk), plus one (hidden + 1)² float64
matrix per layer: 8 * layers * (hidden + 1)² bytes (10 MB for SmolLM2-135M, 4.3 GB for Llama-2-7B).

Progress (with ``progress=True``): a line on stderr per stage (tokenizing, loading, running, done) and, when
stderr is not a terminal (a log), one every tenth of the forward passes; on a terminal a bar instead.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from convert.errors import ConversionError

DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 512
PROGRESS_LINES = 10  # lines per calibration run in a log, besides the stages


def say(enabled: bool, text: str) -> None:
    """One progress line on stderr, through tqdm so that a bar on the terminal stays intact."""
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(f"calibration: {text}", file=sys.stderr)
        sys.stderr.flush()


def read_text(files: list[str], tokens: int) -> list[str]:
    """The calibration documents: the project's one text reader (``kvshrink.text``, the formats training takes),
    read until a generous bound of characters for ``tokens`` tokens."""
    from kvshrink.text import DataError, read_documents

    try:
        return read_documents(files, "text", max_chars=tokens * 16)
    except DataError as exc:
        raise ConversionError(f"--calibration-data: {exc}") from None


def token_blocks(tokenizer, documents: list[str], tokens: int, seq_len: int):
    """Documents tokenized, joined with EOS, cut into (n, seq_len) blocks of at most ``tokens`` in all."""
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        for start in range(0, len(document), 200_000):  # chunks: the tokenizer need not see a whole book
            ids += tokenizer(document[start:start + 200_000], add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                break
        if eos is not None:
            ids.append(eos)
        if len(ids) >= tokens:
            break
    seq_len = min(seq_len, len(ids))
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise ConversionError("--calibration-data is shorter than one token")
    return torch.tensor(ids[:n * seq_len]).reshape(n, seq_len)


def calibration_model(source: Path, documents: list[str], tokens: int, seq_len: int, progress: bool = False):
    """The source model (float32 on CPU; its own dtype spread by accelerate over GPUs) and the calibration blocks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(progress, f"tokenizing up to {tokens:,} tokens of {len(documents)} document(s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"calibration needs the source's tokenizer, which {source} lacks ({exc})") from None
    blocks = token_blocks(tokenizer, documents, tokens, seq_len)
    cuda = torch.cuda.is_available()
    say(progress, f"loading {source} ({'its dtype, device_map=auto' if cuda else 'float32, cpu'}) to run "
                  f"{blocks.shape[0]} sequences of {blocks.shape[1]} tokens")
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype="auto" if cuda else torch.float32, device_map="auto" if cuda else None)
    return model.eval(), blocks


def moment_hook(moments: list, layer: int):
    """A forward pre-hook adding [x, 1][x, 1]ᵀ of its module's input to ``moments[layer]`` (float64)."""
    import torch

    def add(_module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # [x, 1]: biases fold in
        moment = x.T @ x
        moments[layer] = moment if moments[layer] is None else moments[layer] + moment.to(moments[layer].device)
    return add


def attention_moments(source: Path, modules: list[str], documents: list[str], tokens: int = DEFAULT_TOKENS,
                      seq_len: int = DEFAULT_SEQ_LEN, progress: bool = False) -> dict:
    """Per layer, C = Σ [x, 1][x, 1]ᵀ over the calibration tokens, x the input of ``modules[layer]``.

    Args:
        source: the source checkpoint directory (with its tokenizer).
        modules: per layer, the module path of its Q or fused QKV projection.
        documents: calibration text, as ``read_text`` gives it.
        tokens: how many tokens to run.
        seq_len: the length of each forward pass.
        progress: a line on stderr per stage, and a bar on a terminal or a line per tenth of the passes.

    Returns:
        {"moments": [float64 (in + 1, in + 1) per layer], "tokens": n, "seconds": s}.
    """
    started = time.perf_counter()
    model, blocks = calibration_model(source, documents, tokens, seq_len, progress)
    moments: list = [None] * len(modules)
    handles = [model.get_submodule(path).register_forward_pre_hook(moment_hook(moments, n))
               for n, path in enumerate(modules)]
    try:
        _run_blocks(model, blocks, progress)
    finally:
        for handle in handles:
            handle.remove()
    seconds = round(time.perf_counter() - started, 2)
    say(progress, f"{blocks.numel():,} tokens through {len(modules)} layers in {seconds:.1f} s")
    return {"moments": [m.cpu() for m in moments], "tokens": blocks.numel(), "seconds": seconds}


def _run_blocks(model, blocks, progress: bool) -> None:
    """Forward every block (one sequence at a time); a bar on a terminal, a line per tenth in a log."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    every = math.ceil(len(blocks) / PROGRESS_LINES)
    lines = progress and not sys.stderr.isatty()
    started = time.perf_counter()
    with torch.inference_mode():
        for n, block in enumerate(tqdm(blocks, desc="calibrating", unit="seq", disable=not progress or None,
                                       leave=False), 1):
            model(block.unsqueeze(0).to(device), use_cache=False)
            if lines and (n % every == 0 or n == len(blocks)):
                spent = time.perf_counter() - started
                left = spent / n * (len(blocks) - n)
                say(True, f"{n}/{len(blocks)} sequences, {spent:.0f} s, about {left:.0f} s left")
