"""--method svd and --grouping similarity: exact where the heads allow it, function-preserving permutations."""

import json
import math

import pytest
import torch
from textlm import train_tokenizer, write_corpus
from tiny import FAMILIES, logits, make_model
from transformers import AutoModelForCausalLM

from convert import ConversionError, convert_checkpoint
from convert.cli import main
from convert.head_form import LayerHeads, permute


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train, held = write_corpus(tmp_path_factory.mktemp("corpus"))
    return {"train": train, "eval": held, "tokenizer": train_tokenizer(train)}


# family -> (config overrides, RoPE pairing, rotary fraction); each planted test covers one pairing.
PLANTED = {
    "llama": ({}, "half", 1.0),
    "qwen2": ({}, "half", 1.0),  # with Q/K/V biases
    "cohere": (dict(use_qk_norm=False), "interleaved", 1.0),
    "phi": (dict(partial_rotary_factor=0.5), "half", 0.5),  # biases, and half of each head unrotated
}


def _pairs(style: str, head_dim: int, fraction: float) -> tuple[list[int], list[int], list[int]]:
    rotary = int(head_dim * fraction)
    if style == "half":
        a = list(range(rotary // 2))
        b = [i + rotary // 2 for i in a]
    else:
        a = list(range(0, rotary, 2))
        b = [i + 1 for i in a]
    return a, b, list(range(rotary, head_dim))


def _plant(model, family: str, groups: list[list[int]], style: str, fraction: float, seed: int = 0):
    """Make every KV head of a group an exact transform of the group's first head.

    K: a complex factor per rotary frequency (and a real mix on unrotated dims); V: an invertible
    head_dim x head_dim mix. Biases are transformed with their rows, as the input were [x, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size // model.config.num_attention_heads
    a, b, rest = _pairs(style, d, fraction)
    state = model.state_dict()
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for proj in ("k_proj", "v_proj"):
            w = state[prefix + proj + ".weight"]
            bias = state.get(prefix + proj + ".bias")
            rows = torch.cat([w, bias[:, None]], 1) if bias is not None else w.clone()
            heads = rows.reshape(-1, d, rows.shape[1])
            for group in groups:
                base = heads[group[0]]
                for h in group[1:]:
                    if proj == "v_proj":
                        heads[h] = (torch.eye(d) + 0.4 * torch.randn(d, d, generator=gen)) @ base
                        continue
                    c = torch.complex(torch.randn(len(a), generator=gen), torch.randn(len(a), generator=gen))
                    z = torch.complex(base[a], base[b]) * c[:, None]
                    heads[h, a], heads[h, b] = z.real, z.imag
                    if rest:
                        heads[h, rest] = (
                            torch.eye(len(rest)) + 0.4 * torch.randn(len(rest), len(rest), generator=gen)
                        ) @ base[rest]
            rows = heads.reshape(rows.shape)
            w.copy_(rows[:, : w.shape[1]])
            if bias is not None:
                bias.copy_(rows[:, -1])
    return model


def _source(tmp_path, corpus, family: str, groups: list[list[int]]):
    overrides, style, fraction = PLANTED[family]
    model = make_model(family, 4, vocab_size=len(corpus["tokenizer"]), **overrides)
    _plant(model, family, groups, style, fraction)
    path = tmp_path / f"{family}-planted"
    model.save_pretrained(path)
    corpus["tokenizer"].save_pretrained(path)
    return model, path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", list(PLANTED))
def test_svd_is_exact_on_heads_that_are_transforms_of_each_other(family, corpus, tmp_path):
    model, src = _source(tmp_path, corpus, family, [[0, 1], [2, 3]])
    want = logits(model)
    convert_checkpoint(
        src,
        tmp_path / "svd",
        kv_heads=2,
        method="svd",
        calibration_data=[str(corpus["train"])],
        calibration_tokens=2048,
        calibration_seq_len=128,
    )
    convert_checkpoint(src, tmp_path / "mean", kv_heads=2)
    svd, mean = _load(tmp_path / "svd"), _load(tmp_path / "mean")
    assert svd.config.num_key_value_heads == 2
    scale = want.abs().max()
    assert (logits(svd) - want).abs().max() < 1e-4 * scale
    assert (logits(mean) - want).abs().max() > 1e-2 * scale
    report = json.loads((tmp_path / "svd" / "conversion.json").read_text())
    changed = {n.rsplit(".", 2)[-2] for n in report["changed_tensors"]}
    assert changed == {"q_proj", "k_proj", "v_proj", "o_proj" if family != "phi" else "dense"}
    assert report["calibration"]["tokens"] == 2048


def test_similarity_grouping_finds_a_planted_grouping_and_stays_exact(corpus, tmp_path):
    model, src = _source(tmp_path, corpus, "llama", [[0, 2], [1, 3]])
    want = logits(model)
    convert_checkpoint(
        src,
        tmp_path / "out",
        kv_heads=2,
        method="svd",
        grouping="similarity",
        calibration_data=[str(corpus["train"])],
        calibration_tokens=2048,
        calibration_seq_len=128,
    )
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["kv_head_order"] == [[0, 2, 1, 3]] * 2
    assert (logits(_load(tmp_path / "out")) - want).abs().max() < 1e-4 * want.abs().max()
    # contiguous groups pair heads that are not alike: no longer exact
    convert_checkpoint(
        src,
        tmp_path / "contig",
        kv_heads=2,
        method="svd",
        calibration_data=[str(corpus["train"])],
        calibration_tokens=2048,
        calibration_seq_len=128,
    )
    assert (logits(_load(tmp_path / "contig")) - want).abs().max() > 1e-2 * want.abs().max()


def test_similarity_grouping_without_calibration_uses_weights(tmp_path):
    """Mean pooling of near-identical heads: the weights alone reveal which heads belong together."""
    model = make_model("llama", 4)
    state = model.state_dict()
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            heads = state[f"model.layers.{layer}.self_attn.{proj}.weight"].view(4, 8, 64)
            heads[3] = heads[0] + 1e-3 * torch.randn(8, 64)
            heads[2] = heads[1] + 1e-3 * torch.randn(8, 64)
    model.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2, grouping="similarity")
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["kv_head_order"] == [[0, 3, 1, 2]] * 2
    assert (logits(_load(tmp_path / "out")) - logits(model)).abs().max() < 2e-2 * logits(model).abs().max()


def test_permutation_alone_keeps_the_function():
    model = make_model("qwen2", 4)  # biases on Q/K/V
    want = logits(model)
    state = model.state_dict()
    d = 8
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        q = torch.cat([state[p + "q_proj.weight"], state[p + "q_proj.bias"][:, None]], 1).reshape(8, d, -1)
        k = torch.cat([state[p + "k_proj.weight"], state[p + "k_proj.bias"][:, None]], 1).reshape(4, d, -1)
        v = torch.cat([state[p + "v_proj.weight"], state[p + "v_proj.bias"][:, None]], 1).reshape(4, d, -1)
        o = state[p + "o_proj.weight"].reshape(64, 8, d)
        layer = permute(LayerHeads(q, k, v, o), [2, 0, 3, 1])
        q, k, v, o = layer.q, layer.k, layer.v, layer.o
        for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            t = t.reshape(-1, t.shape[-1])
            state[p + name + ".weight"].copy_(t[:, :-1])
            state[p + name + ".bias"].copy_(t[:, -1])
        state[p + "o_proj.weight"].copy_(o.reshape(64, -1))
    assert not torch.equal(
        state["model.layers.0.self_attn.k_proj.weight"],
        make_model("qwen2", 4).state_dict()["model.layers.0.self_attn.k_proj.weight"],
    )
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("mixtral",)] + ["gpt_bigcode", "gpt2"])
def test_svd_and_similarity_convert_every_family_to_a_loadable_model(family, corpus, tmp_path):
    kv = 1 if family in ("gpt_bigcode", "gpt2") else 4
    target = 1 if kv == 1 else 2
    model = make_model(family, 8 if kv == 1 else kv, vocab_size=len(corpus["tokenizer"]))
    model.save_pretrained(tmp_path / "src")
    corpus["tokenizer"].save_pretrained(tmp_path / "src")
    grouping = "contiguous" if family in ("olmo2", "cohere", "stablelm") else "similarity"
    report = convert_checkpoint(
        tmp_path / "src",
        tmp_path / "out",
        kv_heads=target,
        method="svd",
        grouping=grouping,
        calibration_data=[str(corpus["train"])],
        calibration_tokens=1024,
        calibration_seq_len=64,
    )
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.isfinite(logits(out)).all()
    if family in ("qwen3", "olmo2", "cohere", "stablelm"):
        assert report.k_merge.startswith("mean")


def test_bad_calibration_input_is_refused_before_writing(corpus, tmp_path, capsys):
    make_model("llama", 4).save_pretrained(tmp_path / "src")
    with pytest.raises(ConversionError, match="calibration needs the source's tokenizer"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2, method="svd")  # would sample: no tokenizer
    assert (
        main(
            [
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--kv-heads",
                "2",
                "--method",
                "svd",
                "--calibration-data",
                str(tmp_path / "missing.txt"),
            ]
        )
        == 2
    )
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--kv-heads",
                "2",
                "--method",
                "svd",
                "--calibration-data",
                str(corpus["train"]),
            ]
        )
        == 2
    )  # no tokenizer in src
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    make_model("olmo2", 4).save_pretrained(tmp_path / "olmo2")
    with pytest.raises(ConversionError, match="cannot yet permute"):
        convert_checkpoint(tmp_path / "olmo2", tmp_path / "out", kv_heads=2, grouping="similarity")


def test_calibration_improves_held_out_loss_over_mean(corpus, tmp_path):
    """On a model with no planted structure, svd calibrated on one text beats mean on another text."""
    from uptrain.evaluate import perplexity

    model = make_model("llama", 4, vocab_size=len(corpus["tokenizer"]))
    model.save_pretrained(tmp_path / "src")
    corpus["tokenizer"].save_pretrained(tmp_path / "src")
    for method in ("svd", "mean"):
        extra = (
            dict(calibration_data=[str(corpus["train"])], calibration_tokens=4096, calibration_seq_len=128)
            if method == "svd"
            else {}
        )
        convert_checkpoint(tmp_path / "src", tmp_path / method, kv_heads=1, method=method, **extra)
    ppl = {
        m: perplexity(_load(tmp_path / m), corpus["tokenizer"], [str(corpus["eval"])], seq_len=128, max_tokens=4096)[
            "ppl"
        ]
        for m in ("src", "svd", "mean")
    }
    assert all(math.isfinite(p) for p in ppl.values())
    assert abs(math.log(ppl["svd"] / ppl["src"])) < abs(math.log(ppl["mean"] / ppl["src"]))


def test_calibration_prints_a_line_per_stage_and_per_layer(corpus, tmp_path, capfd):
    """Output redirected (no terminal): stages and a line per layer on stderr, so a long calibration is never
    silent; the library call without ``progress`` is quiet."""
    make_model("llama", 4, vocab_size=len(corpus["tokenizer"])).save_pretrained(tmp_path / "src")
    corpus["tokenizer"].save_pretrained(tmp_path / "src")
    options = dict(
        kv_heads=2,
        method="svd",
        calibration_data=[str(corpus["train"])],
        calibration_tokens=20 * 32,
        calibration_seq_len=32,
    )
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=True, **options)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("calibration: ")]
    assert report.calibration["tokens"] == 20 * 32
    assert lines[0].startswith("calibration: 20 sequences of 32 tokens through 2 layers on cpu in float32")
    assert [line.split(" (")[0] for line in lines[1:]] == ["calibration: layer 1/2", "calibration: layer 2/2"]
    convert_checkpoint(tmp_path / "src", tmp_path / "quiet", **options)  # the library call: quiet
    assert "calibration" not in capfd.readouterr().err
