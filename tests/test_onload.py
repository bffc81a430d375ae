"""Calibration one decoder layer at a time: the same numbers as the whole model, one layer in memory, any device."""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from textlm import train_tokenizer, write_corpus
from tiny import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM

from convert import calibrate, convert_checkpoint
from convert.cli import main
from convert.onload import LayerLoader
from convert.walk import Walk
from kvshrink_base.device import pick_device

TOKENS, SEQ = 256, 32
ALL_FAMILIES = [*FAMILIES, "gpt2", "gpt_bigcode"]
SEQUENTIAL = dict(method="aware", calibration_order="sequential", refit_o=True, local_steps=2)
PARALLEL = dict(method="aware", calibration_order="parallel")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train, _ = write_corpus(tmp_path_factory.mktemp("corpus"))
    return train, train_tokenizer(train)


def _source(family: str, corpus, path: Path, layers: int = 2) -> Path:
    return save_tiny(family, corpus[1], path, layers)


def _kv(family: str) -> int:
    return 1 if family.startswith("gpt") else 2  # gpt2 becomes MQA GPTBigCode; bigcode has MHA and MQA forms only


class WholeModel(LayerLoader):
    """The reference: the whole model loaded by transformers' ``from_pretrained``, every layer always in memory."""

    def __init__(self, src_dir, weights, anchors, device, dtype, materialize=True):
        super().__init__(src_dir, weights, anchors, device, dtype, materialize=False)
        self.model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=dtype).eval()

    def onload(self, layer):
        return self.model.get_submodule(self.decoders[layer])

    def offload(self, layer):
        pass


def _convert(src: Path, out: Path, train: Path, monkeypatch, loader=None, **options) -> tuple[dict, list]:
    """(written tensors, each layer's calibration moment) of a conversion, with ``loader`` as the layer loader."""
    moments = {}
    rewrite = calibrate.rewrite

    def spy(plan, state, load, layer, moment=None):
        moments[layer] = moment
        return rewrite(plan, state, load, layer, moment)

    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "rewrite", spy)
        if loader is not None:
            patch.setattr(calibrate, "LayerLoader", loader)
        convert_checkpoint(
            src,
            out,
            kv_heads=_kv(src.name.split("-")[0]),
            calibration_data=[str(train)],
            calibration_tokens=TOKENS,
            calibration_seq_len=SEQ,
            **options,
        )
    return load_file(out / "model.safetensors"), [moments[n] for n in sorted(moments)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("order", ["parallel", "sequential"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layer_wise_calibration_equals_the_whole_model(family, order, corpus, tmp_path, monkeypatch):
    """Moments and every written tensor as with the whole model in memory (the walk run on ``from_pretrained``):
    the skeleton, the onloading from the checkpoint and the offloading change nothing (measured: bit-identical)."""
    train, _ = corpus
    src = _source(family, corpus, tmp_path / f"{family}-src")
    options = SEQUENTIAL if order == "sequential" else PARALLEL
    layer_wise, moments = _convert(src, tmp_path / "layer-wise", train, monkeypatch, **options)
    whole, whole_moments = _convert(src, tmp_path / "whole", train, monkeypatch, loader=WholeModel, **options)
    assert len(moments) == 2 and all(m is not None for m in moments)
    assert max(_relative(a, b) for a, b in zip(moments, whole_moments)) <= 1e-6
    assert set(layer_wise) == set(whole)
    assert max(_relative(layer_wise[k], whole[k]) for k in whole) <= 1e-6


def test_no_more_than_one_decoder_layer_is_ever_in_memory(corpus, tmp_path, monkeypatch):
    """Counted from the model's tensors (a parameter not on ``meta``), at every read from the checkpoint."""
    train, _ = corpus
    src = _source("llama", corpus, tmp_path / "llama-src", layers=4)
    seen, loaders = [], []

    class Counting(LayerLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaders.append(self)
            read = self.weights.read
            self.weights.read = lambda name: (seen.append((name, self.materialized_layers())), read(name))[1]

    _convert(src, tmp_path / "out", train, monkeypatch, loader=Counting, **SEQUENTIAL)
    (loader,) = loaders
    layer_reads = [count for name, count in seen if name.startswith("model.layers.")]
    assert len(layer_reads) >= 4 * 9  # every layer's tensors were read ...
    assert max(layer_reads) <= 1  # ... while at most one layer (the one before, not yet offloaded: none) was held
    assert loader.peak_layers == 1
    assert loader.materialized_layers() == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # the spill is gone


def _layer0_output(model, ids: torch.Tensor) -> torch.Tensor:
    decoders = next(m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList))
    seen = []
    decoders[0].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(ids.unsqueeze(0), use_cache=False)
    return seen[0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_running_model_computes_the_converted_layer(family, corpus, tmp_path, monkeypatch):
    """Sequential calibration writes each converted layer back into the running source model (K/V heads and
    pooled K norms repeated for their groups; gpt2's Conv1D transposed): its layer 0 must compute what the
    converted checkpoint's layer 0 computes, or every layer above is fitted to the wrong inputs."""
    train, _ = corpus
    src = _source(family, corpus, tmp_path / f"{family}-src")
    outputs = []
    write_converted = Walk.write_converted

    def spy(walk, layer, new, has_bias):
        write_converted(walk, layer, new, has_bias)
        if layer == 0:
            decoder = walk.loader.model.get_submodule(walk.loader.decoders[0])
            call = walk.calls[0]
            outputs.append(decoder(next(iter(walk.states)), *call.args, **call.kwargs))

    monkeypatch.setattr(Walk, "write_converted", spy)
    _convert(src, tmp_path / "out", train, monkeypatch, method="aware", calibration_order="sequential")
    blocks = calibrate.token_blocks(corpus[1], calibrate.read_text([str(train)], TOKENS), TOKENS, SEQ)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    running = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert _relative(running, _layer0_output(converted, blocks[0])) <= 1e-5


def test_hidden_states_waiting_in_cpu_memory_change_nothing(corpus, tmp_path, monkeypatch):
    """The accelerator's offload path (hidden states off the device, moved a block at a time), forced on the CPU
    with a tiny memory limit, writes the same tensors."""
    train, _ = corpus
    src = _source("llama", corpus, tmp_path / "llama-src")
    reference, _ = _convert(src, tmp_path / "on-device", train, monkeypatch, **SEQUENTIAL)
    placed = []
    open_walk = calibrate.open_walk

    def limited(*args):
        loader, walk = open_walk(*args, hidden_limit=1)
        placed.append(walk.states.on_device)
        return loader, walk

    monkeypatch.setattr(calibrate, "open_walk", limited)
    offloaded, _ = _convert(src, tmp_path / "offloaded", train, monkeypatch, **SEQUENTIAL)
    assert placed == [False]
    assert all(torch.equal(offloaded[k], reference[k]) for k in reference)


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


@pytest.mark.parametrize("case", ["no tokenizer", "empty text", "one token", "absent device", "not a device"])
def test_bad_input_of_the_calibrated_path_is_one_line(case, corpus, tmp_path, capsys):
    train, tokenizer = corpus
    src = _source("llama", corpus, tmp_path / "src")
    text = train
    extra = []
    if case == "no tokenizer":
        for file in src.iterdir():
            if "token" in file.name:
                file.unlink()
    elif case == "empty text":
        text = tmp_path / "empty.txt"
        text.write_text("")
    elif case == "one token":
        text = tmp_path / "short.txt"
        text.write_text("a")
    else:
        extra = ["--device", "cuda:9" if case == "absent device" else "gpu"]
    code, errors = _run(
        [src, tmp_path / "out", "--kv-heads", "2", "--recommended", "--calibration-data", text, *extra], capsys
    )
    assert code == 2 and len(errors) == 1, errors
    assert not [p for p in tmp_path.iterdir() if p.name not in ("src", "empty.txt", "short.txt")]


def test_dry_run_prints_calibration_memory_and_recommended_sets_the_preset(corpus, tmp_path, capsys):
    train, _ = corpus
    src = _source("llama", corpus, tmp_path / "src")
    assert (
        main(
            [
                str(src),
                str(tmp_path / "out"),
                "--kv-heads",
                "2",
                "--recommended",
                "--dry-run",
                "--calibration-data",
                str(train),
                "--calibration-tokens",
                "256",
                "--calibration-seq-len",
                "32",
                "--local-steps",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "calibration peak" in line)
    assert "GB on cpu (float32): the larger of the start" in line and "and the walk: one layer" in line
    # the formula, term by term, for this model: 64 wide, MHA (8 heads of 8), MLP 96
    from convert.calibrate import memory_estimate
    from convert.engine import _prepare
    from convert.options import ConvertOptions
    from convert.source import open_weights

    options = ConvertOptions.recommended(2, on_cpu=True, calibration_data=[str(train)], local_steps=3)
    plan = _prepare(str(src), tmp_path / "x", options, False, True).plan
    loader = LayerLoader(
        src,
        open_weights(src),
        [plan.layers.source_names[a] for a in plan.layers.anchors],
        pick_device("cpu"),
        torch.float32,
        materialize=False,
    )
    calibration = dataclasses.replace(options, calibration_tokens=256, calibration_seq_len=32)
    memory = memory_estimate(loader, plan.layers, 256, calibration, pick_device("cpu"))
    attention = 4 * 64 * 64  # Q, K, V and O, each 64 x 64
    layer = attention + 3 * 64 * 96 + 2 * 64
    assert memory.layer == 4 * layer and memory.read == 4 * layer  # float32 run, float32 checkpoint, nothing fused
    assert memory.fit == 24 * attention
    assert memory.hidden == 256 * 64 * 4 and memory.copies == 2 + 2 + 1 and memory.block == 32 * 64 * 4
    assert memory.moments == 2 * 65**2 * 8
    assert memory.local == 16 * attention + 16 * (8 * 32 * 64 + 8 * 32**2)
    assert memory.sampling == 0 and memory.on_device
    assert memory.total == max(
        memory.resident + memory.hidden,
        memory.layer + 5 * memory.hidden + memory.local + memory.read + memory.moments + memory.fit,
    )
    sampled = memory_estimate(loader, plan.layers, 256, calibration, pick_device("cpu"), sampled=True)
    model = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    assert sampled.sampling == int(model * 4 * 1.2)
    assert memory.advice(10**12, 10**12) is None
    advice = memory.advice(memory.total - memory.hidden, 10**12)
    assert "--calibration-tokens" in advice and "exceeds this machine" in advice
    assert not (tmp_path / "out").exists()
    assert (
        main(
            [
                str(src),
                str(tmp_path / "out"),
                "--kv-heads",
                "2",
                "--recommended",
                "--calibration-data",
                str(train),
                "--calibration-tokens",
                "256",
                "--calibration-seq-len",
                "32",
                "--local-steps",
                "3",
                "--no-refit-o",
            ]
        )
        == 0
    )
    import json

    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["method"] == "aware"
    assert report["calibration"]["order"] == "sequential"
    assert report["calibration"]["local_steps"] == 3 and report["calibration"]["refit_o"] is False


def test_without_text_calibration_samples_from_the_source(corpus, tmp_path, capsys):
    """No --calibration-data: text is drawn from the source itself; nothing of it remains beside the output."""
    src = _source("llama", corpus, tmp_path / "src")
    assert (
        main(
            [
                str(src),
                str(tmp_path / "out"),
                "--kv-heads",
                "2",
                "--method",
                "aware",
                "--calibration-tokens",
                "128",
                "--calibration-seq-len",
                "32",
            ]
        )
        == 0
    )
    import json

    calibration = json.loads((tmp_path / "out" / "conversion.json").read_text())["calibration"]
    assert calibration["sampled"] is True and calibration["tokens"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_sampling_says_so_before_any_work_where_the_model_cannot_fit(corpus, tmp_path, capsys, monkeypatch):
    """Sampling runs the whole model: where it cannot fit, one line asks for --calibration-data, nothing written."""
    from convert import calibrate as module

    src = _source("llama", corpus, tmp_path / "src")
    monkeypatch.setattr(module, "available_ram", lambda: 1000)
    code, errors = _run([src, tmp_path / "out", "--kv-heads", "2", "--recommended", "--device", "cpu"], capsys)
    assert code == 2 and len(errors) == 1
    assert "runs the whole source model" in errors[0] and "--calibration-data" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
