"""Every family, every layout: conversions that must be exact are checked on logits."""

import json

import pytest
import torch
from tiny import FAMILIES, HEADS, kv_key, logits, make_model, mha_twin
from transformers import AutoModelForCausalLM

from convert import ConversionError, convert_checkpoint

DIVISIBLE = list(FAMILIES)  # families whose architecture has any number of KV heads


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _assert_same_logits(model, reference, what):
    a, b = logits(model), logits(reference)
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1.0), what


@pytest.mark.parametrize("family", DIVISIBLE)
@pytest.mark.parametrize("kv", [2, 1])
def test_repeated_kv_heads_convert_back_exactly(family, kv, tmp_path):
    """An MHA model whose KV heads repeat in groups (a GQA model expanded) converts back to the GQA function."""
    small, mha = mha_twin(family, kv)
    _assert_same_logits(mha, small, "test helper: expansion changed the function")
    mha.save_pretrained(tmp_path / "src")
    targets = [kv, 4] if kv == 2 else [kv]
    for target in targets:
        out = tmp_path / f"out{target}"
        convert_checkpoint(tmp_path / "src", out, kv_heads=target, method="mean")
        converted = _load(out)
        assert getattr(converted.config, kv_key(family)) == target
        _assert_same_logits(converted, small, f"{family}: MHA -> {target} KV heads changed the logits")
        first = tmp_path / f"first{target}"
        convert_checkpoint(tmp_path / "src", first, kv_heads=target, method="first")
        _assert_same_logits(_load(first), small, f"{family}: first-head pooling of equal heads changed the logits")


@pytest.mark.parametrize("family", ["llama", "phi3", "falcon", "olmo2", "stablelm", "cohere"])
def test_merging_different_heads_does_change_logits(family, tmp_path):
    """The logit comparison above is sensitive: pooling heads that differ must show up."""
    model = make_model(family, HEADS)
    model.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=1)
    a, b = logits(_load(tmp_path / "out")), logits(model)
    assert (a - b).abs().max().item() > 1e-2 * b.abs().max().item()


@pytest.mark.parametrize("family", ["gpt_bigcode", "falcon_legacy"])
def test_mha_only_layouts_convert_to_mqa_exactly(family, tmp_path):
    small, mha = mha_twin(family, 1)
    _assert_same_logits(mha, small, "test helper: expansion changed the function")
    mha.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=1)
    converted = _load(tmp_path / "out")
    assert converted.config.multi_query is True
    _assert_same_logits(converted, small, f"{family}: MHA -> MQA changed the logits")
    with pytest.raises(ConversionError, match="only become MHA"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out2", kv_heads=2)


def test_gpt2_becomes_gpt_bigcode_with_equal_logits(tmp_path):
    gpt2 = make_model("gpt2", HEADS)
    gpt2.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "mha", kv_heads=HEADS)
    bigcode = _load(tmp_path / "mha")
    assert type(bigcode).__name__ == "GPTBigCodeForCausalLM" and bigcode.config.multi_query is False
    _assert_same_logits(bigcode, gpt2, "gpt2 -> MHA GPTBigCode changed the logits")
    config = json.loads((tmp_path / "mha" / "config.json").read_text())
    assert config["model_type"] == "gpt_bigcode" and config["activation_function"] == "gelu_new"
    with pytest.raises(ConversionError, match="only become MHA"):
        convert_checkpoint(tmp_path / "src", tmp_path / "gqa", kv_heads=2)


def test_gpt2_with_equal_kv_heads_becomes_exact_mqa(tmp_path):
    gpt2 = make_model("gpt2", HEADS)
    d, e = 8, 64
    with torch.no_grad():
        for block in gpt2.transformer.h:  # Conv1D (in, out), out = [Q | K | V], each H heads of d
            for part in (1, 2):
                w = block.attn.c_attn.weight[:, part * e : (part + 1) * e]
                w.copy_(w[:, :d].repeat(1, HEADS))
                b = block.attn.c_attn.bias[part * e : (part + 1) * e]
                b.copy_(b[:d].repeat(HEADS))
    gpt2.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "mqa", kv_heads=1)
    mqa = _load(tmp_path / "mqa")
    assert mqa.config.multi_query is True
    _assert_same_logits(mqa, gpt2, "gpt2 -> MQA GPTBigCode of equal heads changed the logits")


def test_gpt2_hub_names_without_prefix_and_mask_buffers(tmp_path):
    """The original GPT-2 checkpoints name tensors h.0... and carry attn.bias mask buffers."""
    from safetensors.torch import save_file

    gpt2 = make_model("gpt2", HEADS)
    gpt2.save_pretrained(tmp_path / "ref")
    state = {
        k.removeprefix("transformer."): v.contiguous() for k, v in gpt2.state_dict().items() if k != "lm_head.weight"
    }
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "src" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=HEADS)
    _assert_same_logits(_load(tmp_path / "out"), gpt2, "unprefixed gpt2 names")


@pytest.mark.parametrize("family", ["phi", "stablelm"])
def test_qk_layernorm_variants(family, tmp_path):
    """phi's shared q/k layernorm is copied; stablelm's per-head one is pooled."""
    small, mha = mha_twin(family, 2) if family == "stablelm" else (None, None)
    if family == "phi":
        small = make_model("phi", 2, qk_layernorm=True)
        mha = make_model("phi", HEADS, seed=1, qk_layernorm=True)
        from tiny import expand_kv

        mha.load_state_dict(expand_kv("phi", small.state_dict(), 2))
    _assert_same_logits(mha, small, "test helper")
    mha.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2)
    _assert_same_logits(_load(tmp_path / "out"), small, f"{family} qk-layernorm")
