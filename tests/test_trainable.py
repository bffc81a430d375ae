"""train.trainable subsets select by role from the family table: after a training step exactly the attention
modules (Q, K, V, O and their norms) have moved, in every family, and nothing else (GPTBigCode's MLP c_proj
included, the module a substring match on the attention's c_proj also caught)."""

import pytest
import torch
from tiny import FAMILIES, make_model

from convert import convert_checkpoint
from convert.families import resolve
from uptrain.adapters import set_trainable as _set_trainable
from uptrain.recipe import RecipeError
from uptrain.student import param_groups


def set_trainable(model, subset: str) -> int:
    return _set_trainable(model, subset, adapters=False)


def attention_parameter_names(model) -> set[str]:
    """Every parameter inside each layer's attention module, found from the module tree (not the role table)."""
    _, spec = resolve(model.config.to_dict())
    names = set()
    for layer in range(model.config.num_hidden_layers):
        path = spec.attention.format(layer=layer)
        names |= {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
    return names


def step_and_compare(model, trainable: str) -> set[str]:
    """One AdamW step on a random batch with the subset trainable; returns the names of the parameters moved."""
    set_trainable(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_bigcode", "falcon_legacy"])
def test_attention_subset_moves_exactly_the_attention_modules(family):
    model = make_model(family, kv_heads=2 if family not in ("gpt_bigcode", "falcon_legacy") else 1)
    expected = attention_parameter_names(model)
    everything = {n for n, _ in model.named_parameters()}
    assert expected and everything - expected  # both sides are non-empty
    assert step_and_compare(model, "attention") == expected


def test_gpt2_converted_to_bigcode_keeps_its_mlp_frozen(tmp_path):
    make_model("gpt2", kv_heads=8).save_pretrained(tmp_path / "gpt2")
    convert_checkpoint(tmp_path / "gpt2", tmp_path / "mqa", kv_heads=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa")
    moved = step_and_compare(model, "attention")
    assert moved == attention_parameter_names(model)
    assert not any(".mlp." in n for n in moved) and any(".attn.c_proj." in n for n in moved)


@pytest.mark.parametrize("family", ["llama", "qwen2", "granite"])
def test_kv_subset_moves_only_k_and_v(family):
    moved = step_and_compare(make_model(family, kv_heads=2), "kv")
    assert moved and all(".k_proj." in n or ".v_proj." in n for n in moved)
    assert any(".k_proj." in n for n in moved) and any(".v_proj." in n for n in moved)


def test_unknown_family_is_a_recipe_error():
    model = make_model("llama", kv_heads=2)
    model.config.to_dict = lambda: {"model_type": "mystery", "architectures": ["MysteryForCausalLM"]}
    with pytest.raises(RecipeError, match="mystery is not one"):
        set_trainable(model, "attention")


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode", "granite"])
def test_weight_decay_spares_norms_biases_and_embeddings(family):
    """One AdamW step with zero gradients moves only what decays: every matrix but the embedding shrinks by
    (1 - lr * wd); norms, biases and the (tied) embedding stay bit-equal."""
    model = make_model(family, kv_heads=2 if family != "gpt_bigcode" else 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    embedding = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        spared = p.dim() < 2 or p is embedding
        if spared:
            assert torch.equal(p.detach(), before[name]), name
        else:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1), msg=name)
    assert any(p.dim() < 2 for p in model.parameters())  # the model has norms/biases to spare
