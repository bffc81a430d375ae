"""The converter's output: tensors, config, shards, side files, report."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny import HEADS, make_model
from transformers import AutoModelForCausalLM

from convert import convert_checkpoint


def _tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 4-KV-head llama with tokenizer-side files, tied to nothing (lm_head present)."""
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", 4).save_pretrained(path)
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (path / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "README.md").write_text("the source's own card")
    return path


def test_identity_is_bit_equal(llama_dir, tmp_path):
    convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=4)
    before, after = _tensors(llama_dir), _tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def test_mean_matches_hand_computed_reference(llama_dir, tmp_path):
    report = convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=2)
    before, after = _tensors(llama_dir), _tensors(tmp_path / "out")
    d = 8
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            w = before[name]
            # KV heads 0,1 -> new head 0; heads 2,3 -> new head 1
            expected = torch.cat([(w[0:d] + w[d : 2 * d]) / 2, (w[2 * d : 3 * d] + w[3 * d : 4 * d]) / 2])
            assert torch.allclose(after[name], expected, atol=1e-7), name
    changed = {n for n in before if not torch.equal(before[n], after[n])} if before.keys() == after.keys() else None
    assert changed == set(report.changed_tensors)
    assert all(".k_proj." in n or ".v_proj." in n for n in changed)


def test_first_and_random_methods(llama_dir, tmp_path):
    convert_checkpoint(llama_dir, tmp_path / "first", kv_heads=2, method="first")
    before, first = _tensors(llama_dir), _tensors(tmp_path / "first")
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(first[k], torch.cat([before[k][0:8], before[k][16:24]]))
    convert_checkpoint(llama_dir, tmp_path / "r1", kv_heads=2, method="random", seed=3)
    convert_checkpoint(llama_dir, tmp_path / "r2", kv_heads=2, method="random", seed=3)
    convert_checkpoint(llama_dir, tmp_path / "r3", kv_heads=2, method="random", seed=4)
    r1, r2, r3 = _tensors(tmp_path / "r1")[k], _tensors(tmp_path / "r2")[k], _tensors(tmp_path / "r3")[k]
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    source_std = before[k][0:16].std().item()
    assert 0.7 < r1[0:8].std().item() / source_std < 1.3  # the source's scale
    assert not torch.allclose(r1[0:8], before[k][0:8])


def test_config_changes_only_kv_heads_and_side_files_are_copied(llama_dir, tmp_path):
    out = tmp_path / "out"
    report = convert_checkpoint(llama_dir, out, kv_heads=1)
    src_cfg = json.loads((llama_dir / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    assert {k for k in src_cfg if src_cfg[k] != out_cfg.get(k)} == {"num_key_value_heads"}
    assert set(out_cfg) == set(src_cfg) and out_cfg["num_key_value_heads"] == 1
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (llama_dir / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert str(llama_dir) in card and "4 -> 1" in card and "mean" in card
    assert "base_model:" not in card  # a local path is not a hub id
    saved = json.loads((out / "conversion.json").read_text())
    assert saved["kv_heads_before"] == 4 and saved["kv_heads_after"] == 1
    # 2 (K and V) x 2 layers x heads x head_dim 8 x 4 bytes
    assert report.kv_cache_bytes_per_token_before == 2 * 2 * 4 * 8 * 4
    assert report.kv_cache_bytes_per_token_after == 2 * 2 * 1 * 8 * 4
    assert report.kv_cache_bytes_4k_context_after == 4096 * 2 * 2 * 1 * 8 * 4
    assert report.parameters_before - report.parameters_after == 2 * 2 * 3 * 8 * 64
    assert "lm_head.weight" in _tensors(out)


def test_converted_model_loads_and_generates(llama_dir, tmp_path):
    convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 64)
    ids = torch.tensor([[5, 6, 7]])
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


def test_tied_embeddings_stay_without_lm_head(tmp_path):
    make_model("gemma", HEADS).save_pretrained(tmp_path / "src")
    assert "lm_head.weight" not in _tensors(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2)
    assert "lm_head.weight" not in _tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.head_dim == 16 and model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)


def test_bf16_stays_bf16_and_dtype_casts(tmp_path):
    make_model("qwen2", HEADS).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "auto", kv_heads=2)
    assert {t.dtype for t in _tensors(tmp_path / "auto").values()} == {torch.bfloat16}
    convert_checkpoint(tmp_path / "src", tmp_path / "f32", kv_heads=2, dtype="float32")
    f32 = _tensors(tmp_path / "f32")
    assert {t.dtype for t in f32.values()} == {torch.float32}
    bf = _tensors(tmp_path / "src")
    assert torch.equal(f32["model.embed_tokens.weight"], bf["model.embed_tokens.weight"].float())
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_sharded_in_sharded_out(tmp_path):
    model = make_model("mistral", HEADS)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2, max_shard_size="30KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == report.shards > 2
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    tensors = {}
    for shard in shards:
        with safe_open(shard, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            tensors.update({n: shard.name for n in fh.keys()})
    assert index["weight_map"] == tensors
    total = sum(t.numel() * t.element_size() for t in _tensors(out).values())
    assert index["metadata"]["total_size"] == total
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2


def test_symlinked_hub_cache_layout(tmp_path):
    """A hub-cache snapshot (files symlinked to blobs) converts; the card's base_model is the repository it names."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "models--org--tiny-llama" / "snapshots" / "0123abc"
    make_model("llama", 2).save_pretrained(blobs)
    snapshot.mkdir(parents=True)
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(f)
    report = convert_checkpoint(snapshot, tmp_path / "out", kv_heads=1)
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert report.base_model == "org/tiny-llama"
    assert "\nbase_model: org/tiny-llama\n" in (tmp_path / "out" / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_key_value_heads == 1


def test_pickle_weights_with_allow_pickle(tmp_path):
    model = make_model("llama", 2)
    model.save_pretrained(tmp_path / "src")
    os.remove(tmp_path / "src" / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=1, allow_pickle=True)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = model.state_dict()["model.layers.1.self_attn.v_proj.weight"].reshape(2, 8, 64).mean(0)
    assert torch.allclose(converted.model.layers[1].self_attn.v_proj.weight, expected, atol=1e-6)


def test_dry_run_writes_nothing(llama_dir, tmp_path):
    report = convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=1, dry_run=True)
    assert report.dry_run and report.kv_heads_after == 1
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_asked(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(Exception, match="not empty"):
        convert_checkpoint(llama_dir, out, kv_heads=1)
    assert (out / "keep.txt").read_text() == "user data"
    convert_checkpoint(llama_dir, out, kv_heads=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_midway_leaves_no_output(llama_dir, tmp_path, monkeypatch):
    import convert.engine as engine

    calls = []

    def failing_write_shard(path, tensors, progress):
        calls.append(path)
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "write_shard", failing_write_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=1)
    assert calls and list(tmp_path.iterdir()) == []


def test_source_is_never_modified(llama_dir, tmp_path):
    def snapshot():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in llama_dir.iterdir()}

    before = snapshot()
    convert_checkpoint(llama_dir, tmp_path / "out", kv_heads=2, method="random")
    assert snapshot() == before


@pytest.mark.parametrize("family", ["phi3", "falcon", "stablelm", "olmo2", "cohere", "starcoder2"])
def test_identity_is_bit_equal_for_every_layout(family, tmp_path):
    make_model(family, 4).save_pretrained(tmp_path / "src")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=4)
    before, after = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert report.kv_heads_before == report.kv_heads_after == 4 and report.changed_tensors == []


@pytest.mark.parametrize("family", ["phi3", "falcon", "stablelm", "cohere"])
@pytest.mark.parametrize("method", ["first", "random"])
def test_every_method_on_fused_and_normed_layouts_loads(family, method, tmp_path):
    make_model(family, HEADS).save_pretrained(tmp_path / "src")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2, method=method)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert report.changed_tensors


def test_mixed_dtypes_keep_their_dtypes_and_values(tmp_path):
    """Norms in float32 beside bfloat16 matrices (and an int buffer): each tensor keeps its dtype."""
    from safetensors.torch import save_file

    model = make_model("llama", 4)
    model.save_pretrained(tmp_path / "ref")
    state = {k: (v if "norm" in k else v.to(torch.bfloat16)).contiguous() for k, v in model.state_dict().items()}
    state["model.extra_counter"] = torch.arange(3, dtype=torch.int64)
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "src" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    convert_checkpoint(tmp_path / "src", tmp_path / "out", kv_heads=2)
    after = _tensors(tmp_path / "out")
    for name, tensor in state.items():
        assert after[name].dtype == tensor.dtype, name
        if ".k_proj." not in name and ".v_proj." not in name:
            assert torch.equal(after[name], tensor), name
    k = state["model.layers.0.self_attn.k_proj.weight"].float().reshape(2, 2, 8, 64).mean(1).reshape(16, 64)
    assert torch.equal(after["model.layers.0.self_attn.k_proj.weight"], k.to(torch.bfloat16))
