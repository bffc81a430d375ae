"""The family tables are typed and checked at construction: a misspelt value fails at import, not mid-conversion.
Roles have one home (convert.roles) that the planner and the trainable subsets both read."""

import dataclasses

import pytest

from convert import families, roles
from convert.families import FAMILIES, LLAMA_LIKE, MqaForm, Variant


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rotary": "halve"}, "rotary"),
        ({"layout": "fused"}, "layout"),
        ({"kv_choices": "any"}, "kv_choices"),
        ({"mha_layout": "per-head"}, "mha_layout"),
        (
            {"tensors": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "shared_norm": "n"}},
            "unknown roles",
        ),
        ({"tensors": {"q": "q_proj", "k": "k_proj", "o": "o_proj"}}, "needs roles"),
        ({"kv_choices": "mha_or_mqa"}, "mqa form"),
        ({"attention": "model.layers.self_attn"}, "placeholder"),
        ({"variants": (Variant(when={"x": True}, changes={"rotary": "halve"}),)}, "rotary"),
        ({"variants": (Variant(when={"x": True}, changes={"rotery": "half"}),)}, "unknown fields"),
    ],
)
def test_a_broken_table_is_refused_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LLAMA_LIKE, **changes)


def test_a_broken_mqa_form_is_refused():
    with pytest.raises(ValueError, match="mqa.layout"):
        MqaForm(layout="contigous", config={})


def test_tables_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LLAMA_LIKE.rotary = "none"
    with pytest.raises(TypeError):
        LLAMA_LIKE.tensors["q"] = "query"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_variant_resolves_to_a_valid_family(name):
    family = FAMILIES[name]
    for variant in family.variants:
        resolved = families.resolve({"model_type": name, **variant.when})[1]
        assert resolved.variants == ()
        for key, value in variant.changes.items():
            assert getattr(resolved, key) == value, (name, key)


def test_the_attention_subset_is_every_role_and_only_attention_modules():
    assert set(roles.SUBSETS["attention"]) == set(roles.ROLES)
    bigcode = FAMILIES["gpt_bigcode"]
    pattern = bigcode.parameter_pattern("attention")
    assert pattern.fullmatch("transformer.h.3.attn.c_proj.weight")
    assert not pattern.fullmatch("transformer.h.3.mlp.c_proj.weight")
    assert FAMILIES["qwen3"].modules("attention") == ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    assert FAMILIES["llama"].modules("kv") == ("k_proj", "v_proj")
