"""The decode benchmark: cache bytes read from the cache, the MHA twin, the CLI's files, bad input.

Tiny Llama models (8 query heads, head_dim 8, 2 layers) with a word-level tokenizer; nothing is timed
against a threshold.
"""

import argparse
import csv
import subprocess
import sys

import pytest
import torch
from tiny import HEADS, logits, make_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kvshrink.decode_bench.cli import main
from kvshrink_base.generate import with_cache
from uptrain.decoding import DecodeError
from uptrain.decoding import measure as decoding
from uptrain.decoding.mha_twin import mha_twin, repeat_heads, save_mha_twin

LAYERS, HEAD_DIM = 2, 8
ARGS = [
    "--device",
    "cpu",
    "--batch",
    "1",
    "2",
    "--context",
    "6",
    "12",
    "--new-tokens",
    "2",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--gen-tokens",
    "4",
    "--prompts",
    "w5 w6 w7",
]


def word_tokenizer(prefix: str = "w") -> PreTrainedTokenizerFast:
    """A 96-token word-level tokenizer: <unk> <s> </s> then {prefix}3 ... {prefix}95."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"{prefix}{i}": i for i in range(3, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def save(path, kv_heads, tokenizer=None, **overrides):
    make_model("llama", kv_heads, **overrides).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on shared, busy cores a second thread's barrier waits dwarf these tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{KV heads: checkpoint directory} for 8 (MHA), 2 (GQA) and 1 (MQA), one tokenizer."""
    root, tokenizer = tmp_path_factory.mktemp("bench"), word_tokenizer()
    return {kv: save(root / f"kv{kv}", kv, tokenizer) for kv in (8, 2, 1)}


def loaded(path):
    return decoding.describe(path.name, AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa"), path)


@pytest.mark.parametrize("batch,context,prefill_tokens", [(3, 10, 1000), (4, 10, 20)])  # 2nd: 2 rows repeated
def test_cache_bytes_read_from_the_cache(checkpoints, batch, context, prefill_tokens):
    for kv_heads, path in checkpoints.items():
        model = loaded(path).model
        cache, ids = decoding.prefill(model, batch, context, prefill_tokens)
        assert ids.shape == (batch, 1)
        assert all(layer.keys.shape == (batch, kv_heads, context, HEAD_DIM) for layer in cache.layers)
        assert decoding.cache_bytes(cache) == LAYERS * 2 * batch * context * kv_heads * HEAD_DIM * 4  # float32


def test_measured_cells_ratio_is_the_kv_head_ratio(checkpoints):
    models = [loaded(checkpoints[kv]) for kv in (8, 2, 1)]
    args = argparse.Namespace(device="cpu", warmup=1, new_tokens=2, repeats=3, prefill_tokens=64)
    cells = decoding.measure_cell(models, 2, 9, args)
    assert [c.status for c in cells] == ["ok"] * 3
    assert [c.cache_ratio for c in cells] == [1.0, 2 / 8, 1 / 8]
    assert all(len(c.times) == 3 and c.tokens_per_s_min <= c.tokens_per_s <= c.tokens_per_s_max for c in cells)


def test_out_of_memory_is_a_cell_status(checkpoints, monkeypatch):
    real = decoding.prefill

    def prefill(model, batch, *rest):
        if model.config.num_key_value_heads == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real(model, batch, *rest)

    monkeypatch.setattr(decoding, "prefill", prefill)
    models = [loaded(checkpoints[kv]) for kv in (8, 1)]
    args = argparse.Namespace(device="cpu", warmup=0, new_tokens=1, repeats=1, prefill_tokens=64)
    cells = decoding.measure_cell(models, 2, 4, args)
    assert [c.status for c in cells] == ["OOM", "ok"] and cells[1].cache_ratio == 0.0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_mha_twin_computes_the_same_function(family):
    small = make_model(family, 2)
    twin = mha_twin(small)
    assert twin.config.num_key_value_heads == HEADS and small.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(twin), logits(small), atol=1e-5, rtol=1e-5)


def test_repeat_heads_layout():
    rows = torch.tensor([[10], [11], [20], [21]])  # key: head 0 = rows 10, 11; head 1 = rows 20, 21
    assert repeat_heads(rows, 2, 3).flatten().tolist() == [10, 11] * 3 + [20, 21] * 3


def test_saved_mha_twin_loads_with_the_tokenizer(checkpoints, tmp_path):
    out = save_mha_twin(checkpoints[2], tmp_path / "twin")
    assert (out / "tokenizer.json").is_file()
    twin = AutoModelForCausalLM.from_pretrained(out)
    assert twin.config.num_key_value_heads == HEADS
    torch.testing.assert_close(
        logits(twin), logits(AutoModelForCausalLM.from_pretrained(checkpoints[2])), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", ["olmo2", "gpt2"])
def test_mha_twin_refuses_other_layouts(family):
    with pytest.raises(DecodeError, match="MHA twin"):
        mha_twin(make_model(family, 2 if family == "olmo2" else HEADS))


def test_attention_path_is_observed(checkpoints, monkeypatch):
    mha, gqa = loaded(checkpoints[8]), loaded(checkpoints[2])
    assert "nothing to expand" in decoding.attention_path(mha, "cpu")
    assert "enable_gqa=True" in decoding.attention_path(gqa, "cpu")
    with sdpa_kernel(SDPBackend.MATH):  # the math kernel repeats K/V itself
        assert "kernel EXPANDS" in decoding.attention_path(gqa, "cpu")
    import transformers.integrations.sdpa_attention as sdpa

    monkeypatch.setattr(sdpa, "use_gqa_in_sdpa", lambda *a: False)  # transformers' own fallback for one query
    assert "pack_gqa" in decoding.attention_path(gqa, "cpu")


def test_cli_writes_csv_png_and_compares_outputs(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = decoding.measure_cell

    def measure_cell(*args):
        assert out.is_dir()  # --out exists before the first measurement: a bad one fails in seconds
        return real(*args)

    monkeypatch.setattr(decoding, "measure_cell", measure_cell)
    assert (
        main([str(checkpoints[2]), str(checkpoints[1]), "--mha-twin", "--out", str(out), "--memory-budget", "1", *ARGS])
        == 0
    )
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    names = ["kv2 (MHA twin)", "kv2", "kv1"]
    expected = [(name, b, c) for b in ("1", "2") for c in ("6", "12") for name in names]
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == expected
    assert {r["status"] for r in rows} == {"ok"}
    assert [float(r["cache_ratio"]) for r in rows[:3]] == [1.0, 2 / 8, 1 / 8]
    assert int(rows[0]["cache_bytes"]) == LAYERS * 2 * 1 * 6 * HEADS * HEAD_DIM * 4
    assert (out / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "fit.csv").open() as f:
        fit = list(csv.DictReader(f))
    per_seq = LAYERS * 2 * 2048 * HEAD_DIM * 4  # bytes per KV head of one sequence at --fit-context 2048
    weights = [loaded(checkpoints[kv]).weight_bytes for kv in (8, 2, 1)]  # the twin has the MHA model's shapes
    assert [int(r["largest_batch"]) for r in fit] == [
        int((1e9 - w) // (per_seq * kv)) for w, kv in zip(weights, (8, 2, 1))
    ]
    captured = capsys.readouterr()
    printed = captured.out
    cell_lines = [line for line in captured.err.splitlines() if line.startswith("  ") and "tokens/s" in line]
    assert [line.split(":")[:2] for line in cell_lines] == [
        [f"  {name}", f" batch {b}, context {c}"] for b in (1, 2) for c in (6, 12) for name in names
    ]
    medians = [float(line.split(": ")[-1].split()[0].replace(",", "")) for line in cell_lines]
    assert medians == [round(float(r["tokens_per_s"]), 1) for r in rows]  # the line says what the CSV holds
    texts = dict(map(str.strip, line.split(" | ", 1)) for line in printed.splitlines() if line.startswith("    kv"))
    assert list(texts) == names and texts["kv2 (MHA twin)"] == texts["kv2"]  # same function, same greedy text
    assert "K/V NOT expanded" in printed or "EXPANDS" in printed
    assert (out / "report.txt").read_text().strip() in printed


def test_synthetic_variants_without_tokenizer(tmp_path, capsys):
    assert (
        main(
            [
                "--synthetic",
                "llama-tiny",
                "--out",
                str(tmp_path),
                *ARGS[:2],
                "--batch",
                "2",
                "--context",
                "5",
                "--new-tokens",
                "1",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["kv_heads"], float(r["cache_ratio"])) for r in rows] == [
        ("llama-tiny-mha", "4", 1.0),
        ("llama-tiny-gqa2", "2", 0.5),
        ("llama-tiny-mqa", "1", 0.25),
    ]
    assert "outputs compared: skipped" in capsys.readouterr().out


BAD = {  # case -> (argv from (tmp_path, checkpoints), what the error line says)
    "missing": (lambda tmp, ck: [tmp / "nope", ck[1]], "nope: no such directory"),
    "no config": (lambda tmp, ck: [tmp, ck[1]], "no config.json"),
    "truncated": (lambda tmp, ck: [ck[2], truncated(ck[1], tmp / "cut")], "is truncated"),
    "vocab": (lambda tmp, ck: [ck[2], save(tmp / "vocab", 1, vocab_size=64)], "vocab_size"),
    "tokenizer": (lambda tmp, ck: [ck[2], save(tmp / "tok", 1, word_tokenizer("x"))], "another tokenizer"),
    "batch": (lambda tmp, ck: [ck[2], ck[1], "--batch", "4", "0"], "--batch must be positive"),
    "context": (lambda tmp, ck: [ck[2], ck[1], "--context", "-8"], "--context must be positive"),
    "one model": (lambda tmp, ck: [ck[2]], "at least one CONVERTED"),
    "synthetic": (lambda tmp, ck: ["--synthetic", "llama-tiny", ck[2]], "give no checkpoint"),
    "absent device": (lambda tmp, ck: [ck[2], ck[1], "--device", "cuda"], "--device cuda: no such device here"),
    "not a device": (lambda tmp, ck: [ck[2], ck[1], "--device", "tpu"], "--device 'tpu' is not a device"),
}


def truncated(checkpoint, copy):
    """A copy of `checkpoint` whose model.safetensors lost its last 100 bytes (as an interrupted download)."""
    import shutil

    shutil.copytree(checkpoint, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:-100])
    return copy


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "--device cuda" is absent, GPU or not
    make_argv, expected = BAD[case]
    argv = [str(a) for a in make_argv(tmp_path, checkpoints)]
    capsys.readouterr()  # save_pretrained's own progress bar, when building the bad checkpoint
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--batch", "x"], ["--static-cache", "jit"], ["--dtype"]])
def test_argument_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: argument --") and err.count("\n") == 1, err


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kvshrink.decode_bench", str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_synthetic_1b_shapes_on_meta():
    """The GPU run's synthetic model: 0.83B (MQA) to 0.95B (MHA) parameters, head_dim 128, 16 / 8 / 1 KV heads."""
    from transformers import LlamaConfig

    from uptrain.decoding.bench import SYNTHETIC

    shape, variants = SYNTHETIC["llama-1b"]
    assert variants == {"mha": 16, "gqa8": 8, "mqa": 1}
    for kv_heads in variants.values():
        config = LlamaConfig(**shape, num_key_value_heads=kv_heads)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        attention = model.model.layers[0].self_attn
        assert attention.k_proj.weight.shape == (kv_heads * 128, 2048) and attention.head_dim == 128
        assert 0.8e9 < sum(p.numel() for p in model.parameters()) < 1.0e9  # MHA 0.95B, GQA-8 0.89B, MQA 0.83B


def test_static_cache_decodes_the_same_tokens_and_rewinds():
    """The StaticCache path (--static-cache) continues a prefilled cache to the same greedy tokens as the
    DynamicCache path, and a rewind between repeats replays the same tokens (not a shifted continuation)."""
    torch.manual_seed(0)
    model = make_model("llama", 2).eval()
    m = decoding.describe("gqa", model, None)
    torch.manual_seed(1)
    cache, ids = decoding.prefill(model, batch=4, context=10, prefill_tokens=20)  # 2 rows prefilled, repeated
    static = decoding.to_static(model, cache, room=6)
    step = decoding.decode_step(m, "eager")
    for n in (1, 3, 6, 3):
        want = decoding.decode(model, cache, ids, n)
        got = decoding.decode(step, static, ids, n)
        assert torch.equal(got, want), n
        assert cache.get_seq_length() == 10 + n and all(int(x.cumulative_length) == 10 + n for x in static.layers)
        decoding.rewind(static, n)
        decoding.rewind(cache, n)
    assert all(int(layer.cumulative_length) == 10 for layer in static.layers)


def test_a_compiled_forward_takes_its_cache_under_the_forward_s_own_name():
    """--static-cache compile decodes through torch.compile(model.forward), a function with no ``forward`` of its
    own: with_cache reads the cache argument's name from the function itself (it raised AttributeError)."""
    model = make_model("llama", 2).eval()
    compiled = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)  # compiles on its first call
    assert with_cache(compiled, "CACHE") == with_cache(model, "CACHE")
