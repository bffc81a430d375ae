"""An independent oracle for the layer-wise walk: the model's own forward, as ``from_pretrained`` loads it.

Hooks on every decoder layer of the whole model record what the model itself feeds each layer (its own masks,
positions and RoPE) and what the layer returns. The walk in parallel order must see and produce the same, layer
by layer, on every family and on models whose layers differ in attention type (sliding windows shorter than the
calibration sequences), where a walk that gives every layer the first layer's arguments goes wrong.
"""

from pathlib import Path

import pytest
import torch
from textlm import train_tokenizer, write_corpus
from tiny import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM

from convert import calibrate, convert_checkpoint

ALL_FAMILIES = [*FAMILIES, "gpt2", "gpt_bigcode"]
# Layers of mixed attention types: (family, config overrides), sequences of 64 tokens.
MIXED = {
    "gemma2-sliding": ("gemma2", dict(sliding_window=16)),  # sliding, full, sliding
    "mistral-sliding": ("mistral", dict(sliding_window=16)),  # every layer sliding
    "qwen2-sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    ),  # full, sliding...
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    return train, train_tokenizer(train)


def _source(family: str, overrides: dict, corpus, path: Path) -> Path:
    return save_tiny(family, corpus[1], path, 3, **overrides)


def _walk_layers(src: Path, train: Path, seq: int, monkeypatch) -> tuple[torch.Tensor, list, list]:
    """The calibration blocks and, per layer, the walk's inputs and outputs (parallel order)."""
    blocks, inputs, outputs = [], [], []
    open_walk, parallel = calibrate.open_walk, calibrate._parallel_layer

    def spy_open(*args):
        blocks.append(args[5])
        return open_walk(*args)

    def spy_layer(walk, layer, decoder, how):
        inputs.append([b.clone() for b in walk.states])
        result = parallel(walk, layer, decoder, how)
        outputs.append([b.clone() for b in walk.states])
        return result

    monkeypatch.setattr(calibrate, "open_walk", spy_open)
    monkeypatch.setattr(calibrate, "_parallel_layer", spy_layer)
    kv = 1 if src.name.startswith("gpt") else 2
    convert_checkpoint(
        src,
        src.parent / "out",
        kv_heads=kv,
        method="aware",
        calibration_data=[str(train)],
        calibration_tokens=4 * seq,
        calibration_seq_len=seq,
    )
    return blocks[0], inputs, outputs


def _oracle_layers(src: Path, blocks: torch.Tensor) -> tuple[list, list]:
    """Per layer, every block's inputs and outputs as the whole model's own forward computes them."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    decoders = next(m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList))
    inputs: list = [[] for _ in decoders]
    outputs: list = [[] for _ in decoders]
    for index, decoder in enumerate(decoders):
        decoder.register_forward_pre_hook(
            lambda _m, args, kwargs, i=index: inputs[i].append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        decoder.register_forward_hook(
            lambda _m, _a, out, i=index: outputs[i].append((out[0] if isinstance(out, tuple) else out).clone())
        )
    with torch.no_grad():
        for block in blocks:
            model(block.unsqueeze(0), use_cache=False)
    return inputs, outputs


def _worst(walk: list, oracle: list) -> float:
    return max(
        ((a - b).norm() / b.norm()).item() for layer_a, layer_b in zip(walk, oracle) for a, b in zip(layer_a, layer_b)
    )


def _check(src: Path, train: Path, seq: int, monkeypatch) -> None:
    blocks, walk_in, walk_out = _walk_layers(src, train, seq, monkeypatch)
    oracle_in, oracle_out = _oracle_layers(src, blocks)
    assert len(walk_in) == len(oracle_in) == 3 and all(len(b) == len(blocks) for b in walk_in)
    assert _worst(walk_in, oracle_in) <= 1e-5
    assert _worst(walk_out, oracle_out) <= 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_walk_feeds_every_layer_what_the_model_itself_does(family, corpus, tmp_path, monkeypatch):
    _check(_source(family, {}, corpus, tmp_path / f"{family}-src"), corpus[0], 32, monkeypatch)


@pytest.mark.parametrize("name", MIXED)
def test_layers_of_other_attention_types_get_their_own_masks(name, corpus, tmp_path, monkeypatch):
    """Sliding windows of 16 under sequences of 64: a full-attention layer given a sliding layer's mask (or the
    reverse) computes something else, and the next layer's inputs differ."""
    family, overrides = MIXED[name]
    _check(_source(family, overrides, corpus, tmp_path / f"{family}-src"), corpus[0], 64, monkeypatch)
