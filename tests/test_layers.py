"""The contracts of the converter's core: fused layouts as pure row permutations (integer-labelled rows),
the one layer-wise path (each layer computed once, in any write order), and the merge registry (every
registered method converts every family)."""

import random
from collections import Counter

import pytest
import torch
from textlm import train_tokenizer, write_corpus
from tiny import FAMILIES, logits, make_model, mha_twin
from transformers import AutoModelForCausalLM

from convert import convert_checkpoint, families, layouts
from convert.layers import LayerResults, LayerState
from convert.merge import GROUPINGS, METHODS
from convert.plan import plan_conversion, read_dims
from convert.source import open_weights, read_config

H, G, D = 4, 2, 2


def labelled(kind: int, heads: int) -> torch.Tensor:
    """(heads, D, 3): row (h, i) holds kind*100 + h*10 + i in every column (kind 1 query, 2 key, 3 value)."""
    label = torch.tensor([[kind * 100 + h * 10 + i for i in range(D)] for h in range(heads)], dtype=torch.float32)
    return label.unsqueeze(-1).expand(heads, D, 3).clone()


def rows(*blocks: tuple[int, int]) -> list[int]:
    """The labels of (kind, head) blocks in order, D rows each."""
    return [kind * 100 + h * 10 + i for kind, h in blocks for i in range(D)]


@pytest.mark.parametrize(
    "layout, kv, expected",
    [
        # [Q1 .. QH | K1 .. KG | V1 .. VG]
        ("contiguous", G, rows((1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1))),
        # [q1 .. qg, k1, v1, q(g+1) .. q2g, k2, v2]
        ("grouped", G, rows((1, 0), (1, 1), (2, 0), (3, 0), (1, 2), (1, 3), (2, 1), (3, 1))),
        # [q1, k1, v1, q2, k2, v2, ...] (G = H)
        ("per_head", H, rows(*[(kind, h) for h in range(H) for kind in (1, 2, 3)])),
    ],
)
def test_fused_layouts_order_rows_as_documented_and_round_trip(layout, kv, expected):
    q, k, v = labelled(1, H), labelled(2, kv), labelled(3, kv)
    fused = layouts.join(layout, q, k, v)  # (rows, 3)
    assert fused[:, 0].tolist() == expected
    for part, again in zip((q, k, v), layouts.split(layout, fused, H, kv, D)):
        assert torch.equal(part, again)
    bias = layouts.join(layout, q[..., 0], k[..., 0], v[..., 0])  # a bias is cut the same way
    assert bias.tolist() == expected


def _layer_results(tmp_path, method: str):
    model = make_model("llama", 4)
    model.save_pretrained(tmp_path / "src")
    config = read_config(tmp_path / "src")
    spec = families.resolve(config)[1]
    weights = open_weights(tmp_path / "src", False)
    plan = plan_conversion(weights, config, spec, read_dims(config, spec), 2, method, None, 0)
    planned = Counter({layer: len(members) for layer, members in plan.layers.sources.items()})
    keys = [(layer, role, param) for layer, members in plan.layers.sources.items() for role, param in members]
    return lambda: LayerResults(plan.layers, LayerState(), planned, weights.read), keys, plan


@pytest.mark.parametrize("method", ["mean", "random"])
def test_each_layer_is_computed_once_in_any_write_order(tmp_path, method):
    make, keys, plan = _layer_results(tmp_path, method)
    in_order = make()
    reference = {key: in_order.take(*key) for key in keys}
    shuffled = make()
    order = keys[:]
    random.Random(0).shuffle(order)
    assert order != keys
    again = {key: shuffled.take(*key) for key in order}
    assert all(torch.equal(again[key], reference[key]) for key in keys)  # random: one stream per layer
    assert in_order.computed == shuffled.computed == Counter({0: 1, 1: 1})
    assert not shuffled._held  # every layer released after its last tensor
    assert {role for _, role, _ in keys} == {"k", "v"}  # pooling: Q and O are neither loaded nor rewritten
    assert plan.changed == sorted(n for members in plan.layers.sources.values() for n in members.values())


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    train, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    return train, train_tokenizer(train)


def _convert(family, method, grouping, calibration, tmp_path):
    """The MHA twin of a 2-KV-head model converted back to 2 KV heads by ``method``; returns (small, converted)."""
    train, tokenizer = calibration
    small, mha = mha_twin(family, 2, vocab_size=len(tokenizer))
    mha.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    needs_text = METHODS[method].calibrated or GROUPINGS[grouping].permutes
    extra = dict(calibration_data=[str(train)], calibration_tokens=512, calibration_seq_len=64) if needs_text else {}
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2, method=method, grouping=grouping, **extra)
    return small, AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_registered_method_converts_every_family(family, method, calibration, tmp_path):
    """Equal heads in each group: every method but random gives back the 2-KV-head function exactly."""
    small, converted = _convert(family, method, "contiguous", calibration, tmp_path)
    a, b = logits(converted), logits(small)
    error = (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
    if method == "random":
        assert torch.isfinite(a).all() and error > 1e-2
    else:
        assert error <= 1e-4, f"{family} {method}: {error}"


@pytest.mark.parametrize("grouping", [g for g in GROUPINGS if GROUPINGS[g].permutes])
def test_every_permuting_grouping_keeps_exact_merges_exact(grouping, calibration, tmp_path):
    small, converted = _convert("llama", "mean", grouping, calibration, tmp_path)
    a, b = logits(converted), logits(small)
    assert (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0)
