"""One device chooser for the whole project (``kvshrink_base.device``): its choice on simulated machines, every
command's ``--device`` through it (a bad one: one line, exit 2, nothing written), and no other place choosing.

Machines are simulated by replacing torch's own answers (``torch.cuda.is_available``, ``torch.cuda.device_count``,
``torch.backends.mps.is_available``): what each machine should give is written out here, not derived.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny import make_model

from convert.cli import main as convert_main
from kvshrink.decode_bench import cli as decode_bench
from kvshrink_base import sample as sampler
from kvshrink_base.device import DeviceError, pick_device, valid_name
from kvshrink_base.errors import KvshrinkError
from uptrain import compare, evaluate
from uptrain.decoding import bench
from uptrain.evaluate import main as evaluate_main
from uptrain.sample.cli import main as sample_main

ROOT = Path(__file__).resolve().parent.parent
MACHINES = {  # name -> (CUDA GPUs, MPS present)
    "two GPUs and MPS": (2, True),
    "one GPU": (1, False),
    "MPS only": (0, True),
    "CPU only": (0, False),
}


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``machine(name)`` makes torch answer as the machine of ``MACHINES`` would, for the test."""

    def simulate(name: str) -> None:
        gpus, mps = MACHINES[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return simulate


@pytest.mark.parametrize(
    "name, expected", [("two GPUs and MPS", "cuda"), ("one GPU", "cuda"), ("MPS only", "mps"), ("CPU only", "cpu")]
)
def test_auto_takes_cuda_then_mps_then_the_cpu(machine, name, expected):
    machine(name)
    assert pick_device("auto") == pick_device(None) == pick_device() == torch.device(expected)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:1", "mps"])
def test_a_present_device_is_the_one_named(machine, name):
    machine("two GPUs and MPS")
    assert pick_device(name) == torch.device(name)


@pytest.mark.parametrize(
    "name, absent",
    [
        ("CPU only", "cuda"),
        ("CPU only", "cuda:0"),
        ("CPU only", "mps"),
        ("MPS only", "cuda"),
        ("one GPU", "mps"),
        ("one GPU", "cuda:1"),
        ("two GPUs and MPS", "cuda:2"),
    ],
)
def test_an_absent_device_is_one_line_naming_the_flag(machine, name, absent):
    machine(name)
    with pytest.raises(DeviceError) as refused:
        pick_device(absent)
    line = str(refused.value)
    assert line.startswith(f"--device {absent}: no such device here") and "\n" not in line, line


@pytest.mark.parametrize("text", ["tpu", "gpu", "cuda:x", "cuda:", "cuda:-1", "CUDA", "cuda 0", "", "auto:0"])
def test_what_is_no_device_is_refused_wherever_it_runs(machine, text):
    machine("two GPUs and MPS")
    assert not valid_name(text)
    with pytest.raises(DeviceError) as refused:
        pick_device(text)
    line = str(refused.value)
    assert line.startswith(f"--device {text!r} is not a device") and "\n" not in line, line
    assert isinstance(refused.value, KvshrinkError) and refused.value.exit_code == 2


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny checkpoint, a text file): good inputs, so that only ``--device`` is wrong."""
    root = tmp_path_factory.mktemp("device")
    make_model("llama", 2).save_pretrained(root / "model")
    (root / "text.txt").write_text("Some text to score, long enough for a block or two of it.\n" * 8)
    return root / "model", root / "text.txt"


COMMANDS = {  # name -> (main, argv(model, text, scratch folder) before --device)
    "convert --recommended": (convert_main, lambda m, t, tmp: [m, tmp / "out", "--kv-heads", "1", "--recommended"]),
    "uptrain.sample": (sample_main, lambda m, t, tmp: [m, tmp / "samples.jsonl", "--tokens", "8"]),
    "uptrain.evaluate": (evaluate_main, lambda m, t, tmp: [m, "--data", t, "--seq-len", "16"]),
    "uptrain.evaluate, compared": (
        evaluate_main,
        lambda m, t, tmp: [m, m, "--data", t, "--seq-len", "16", "--out", tmp / "out", "--decode"],
    ),
    "decode_bench": (decode_bench.main, lambda m, t, tmp: [m, m, "--out", tmp / "out"]),
}


@pytest.mark.parametrize(
    "name, device", [("CPU only", "cuda:7"), ("CPU only", "mps"), ("one GPU", "cuda:1"), ("two GPUs and MPS", "tpu")]
)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_bad_device_through_the_chooser(machine, good, tmp_path, capsys, command, name, device):
    machine(name)
    with pytest.raises(DeviceError) as chooser:
        pick_device(device)
    main, argv = COMMANDS[command]
    assert main([str(a) for a in argv(*good, tmp_path)] + ["--device", device]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {chooser.value}"]
    assert list(tmp_path.iterdir()) == []


class Loaded(KvshrinkError):
    """Raised by the stand-in loader once it has seen the device: the command stops there, exit 2."""


LOADERS = {  # name -> (module whose load_model_and_tokenizer the command calls, main, argv(model, text, scratch))
    "uptrain.sample": (sampler, sample_main, lambda m, t, tmp: [m, tmp / "samples.jsonl", "--tokens", "8"]),
    "uptrain.evaluate": (evaluate, evaluate_main, lambda m, t, tmp: [m, "--data", t, "--seq-len", "16"]),
    "uptrain.evaluate, compared": (compare, evaluate_main, lambda m, t, tmp: [m, m, "--data", t, "--seq-len", "16"]),
}


@pytest.mark.parametrize(
    "name, given, expected",
    [
        ("MPS only", [], "mps"),
        ("two GPUs and MPS", [], "cuda"),
        ("two GPUs and MPS", ["--device", "cuda:1"], "cuda:1"),
        ("two GPUs and MPS", ["--device", "cpu"], "cpu"),
    ],
)
@pytest.mark.parametrize("command", list(LOADERS))
def test_every_command_loads_onto_the_device_chosen(
    machine, good, tmp_path, capsys, monkeypatch, command, name, given, expected
):
    module, main, argv = LOADERS[command]
    seen = []

    def loader(path: str, *args: object, device: torch.device | None = None, **kwargs: object) -> None:
        seen.append(device)
        raise Loaded("loaded")

    monkeypatch.setattr(module, "load_model_and_tokenizer", loader)
    machine(name)
    assert main([str(a) for a in argv(*good, tmp_path)] + given) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: loaded"
    assert seen == [torch.device(expected)]


SMALL = [[1, 4], [256, 1024], 16, 1024]  # the CPU's grid: batch, context, new tokens, prefill tokens
LARGE = [[1, 8, 32, 128], [512, 2048, 8192], 32, 32768]  # CUDA's


@pytest.mark.parametrize(
    "name, device, expected, grid",
    [
        ("MPS only", "auto", "mps", SMALL),
        ("CPU only", "auto", "cpu", SMALL),
        ("two GPUs and MPS", "auto", "cuda", LARGE),
        ("two GPUs and MPS", "cuda:1", "cuda:1", LARGE),
        ("two GPUs and MPS", "mps", "mps", SMALL),
    ],
)
def test_the_decode_bench_takes_the_grid_of_the_device_chosen(machine, good, tmp_path, name, device, expected, grid):
    machine(name)
    options = bench.checkpoint_options([str(good[0])] * 2, tmp_path / "out", device)
    assert options.device == expected
    assert [options.batch, options.context, options.new_tokens, options.prefill_tokens] == grid


CHOOSING = re.compile(r"\b(cuda|mps)\.is_available\(|\bcuda\.device_count\(|\bdefault_device\b")
ALLOWED = {  # the only modules that may ask torch which devices there are
    "kvshrink_base/device.py": "the chooser itself",
    "uptrain/train.py": "accelerate's setup, which picks training's device: CPU or GPU, and bf16 where it runs",
}


def test_no_other_module_chooses_a_device():
    found = {}
    for package in ("kvshrink_base", "convert", "uptrain", "kvshrink"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if CHOOSING.search(line)]
            if lines:
                found[path.relative_to(ROOT).as_posix()] = lines
    assert {p: lines for p, lines in found.items() if p not in ALLOWED} == {}
    assert set(ALLOWED) <= set(found), "an allowed module no longer asks: take it off ALLOWED"
