"""The bad-input matrix every command of the project is swept with (``tests/test_bad_inputs.py``).

The cases are those ``python -m convert`` is tested on (``tests/test_cli.py``): a model path that is missing, a
file, not a checkpoint, with an unreadable config or no weights, a truncated or corrupt safetensors file; an
output that is an existing file or lies below one (the OS refuses that even to root, who may write anywhere
else); a data file (text to train, score or calibrate on) that is missing, empty, unreadable, a directory or
binary. Each command's expected behaviour is the same: exactly one stderr line starting ``error: ``, exit code
2, no traceback, nothing created. A command joins by adding an entry to ``COMMANDS``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BadInput:
    """One bad argument: ``make(tmp, good)`` builds it from a scratch folder and a good checkpoint."""

    name: str
    role: str  # "model" (a checkpoint argument), "out" (an output directory argument) or "data" (a text file)
    make: Callable[[Path, Path], Path]
    says: tuple[str, ...]  # the error line holds one of these


def _copy(good: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(good, tmp / "model"))


def _file(tmp: Path, _good: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("not a checkpoint")
    return path


def _no_config(tmp: Path, _good: Path) -> Path:
    (tmp / "model").mkdir()
    (tmp / "model" / "notes.txt").write_text("not a checkpoint")
    return tmp / "model"


def _bad_config(tmp: Path, good: Path) -> Path:
    model = _copy(good, tmp)
    (model / "config.json").write_text("{not json")
    return model


def _no_weights(tmp: Path, good: Path) -> Path:
    model = _copy(good, tmp)
    (model / "model.safetensors").unlink()
    return model


def _truncated(tmp: Path, good: Path) -> Path:
    model = _copy(good, tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-100])  # an interrupted download
    return model


def _corrupt(tmp: Path, good: Path) -> Path:
    model = _copy(good, tmp)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:8] + b"}" + data[9:])  # the header's JSON broken
    return model


def _empty_text(tmp: Path, _good: Path) -> Path:
    path = tmp / "empty.txt"
    path.write_text("")
    return path


def _unreadable_text(tmp: Path, _good: Path) -> Path:
    """Mode 000: root reads it anyway (``needs_reader``), so the sweep skips it there."""
    path = tmp / "locked.txt"
    path.write_text("Some text nobody may read.\n")
    path.chmod(0)
    return path


def _text_directory(tmp: Path, _good: Path) -> Path:
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # no file of a text type in it
    return tmp / "corpus"


def _binary_text(tmp: Path, _good: Path) -> Path:
    path = tmp / "text.txt"
    path.write_bytes(bytes(range(256)) * 64)  # a binary file under a text name
    return path


def needs_reader(case: BadInput) -> bool:
    """Whether the case relies on file permissions, which root ignores."""
    return case.make is _unreadable_text and os.geteuid() == 0


def _out_file(tmp: Path, _good: Path) -> Path:
    path = tmp / "results.txt"
    path.write_text("the user's file")
    return path


def _out_below_file(tmp: Path, good: Path) -> Path:
    return _out_file(tmp, good) / "run"


CASES = [
    BadInput("missing path", "model", lambda tmp, good: tmp / "nowhere", ("does not exist", "no such directory")),
    BadInput("a file, not a directory", "model", _file, ("is a file",)),
    BadInput("not a checkpoint (no config.json)", "model", _no_config, ("no config.json",)),
    BadInput("unreadable config.json", "model", _bad_config, ("cannot read",)),
    BadInput("no weights", "model", _no_weights, ("has no model.safetensors",)),
    BadInput("truncated safetensors", "model", _truncated, ("is truncated",)),
    BadInput("corrupt safetensors header", "model", _corrupt, ("is corrupt",)),
    BadInput("output is an existing file", "out", _out_file, ("is a file", "is not a directory")),
    BadInput("output below a file", "out", _out_below_file, ("is a file", "Not a directory")),
    BadInput("missing data file", "data", lambda tmp, good: tmp / "nowhere.txt", ("does not exist",)),
    BadInput("empty data file", "data", _empty_text, ("is empty",)),
    BadInput("unreadable data file", "data", _unreadable_text, ("Permission denied",)),
    BadInput("data file is a directory", "data", _text_directory, ("is a directory",)),
    BadInput("binary data file", "data", _binary_text, ("not UTF-8 text",)),
]


def _text(files: Path) -> Path:
    path = files / "text.txt"
    path.write_text("Some text to score.\n\nAnd a second paragraph of it.\n")
    return path


def _recipe(model: Path, out: Path, files: Path, data: Path, **sections) -> Path:
    recipe = {"model": str(model), "output_dir": str(out), "data": {"train": [str(data)], "seq_len": 16}, **sections}
    path = files / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


@dataclass(frozen=True)
class Command:
    """A CLI under the sweep: ``argv(model, out, good, files, data)`` -> the arguments after ``python``; ``files``
    is a folder for what the command reads besides (text, a recipe), written before the sweep looks for new
    files; ``data`` is the text file to read (None: a good one the command writes into ``files``)."""

    name: str
    argv: Callable[[Path, Path, Path, Path, Path | None], list[str]]
    roles: tuple[str, ...]  # which of the matrix's roles the command has


COMMANDS = [
    Command(
        "convert",
        lambda model, out, good, files, data: ["-m", "convert", str(model), str(out), "--kv-heads", "1"],
        ("model", "out"),
    ),
    Command(
        "convert --calibration-data",
        lambda model, out, good, files, data: [
            "-m",
            "convert",
            str(model),
            str(out),
            "--kv-heads",
            "1",
            "--method",
            "svd",
            "--calibration-data",
            str(data or _text(files)),
        ],
        ("data",),
    ),
    Command(
        "decode_bench",
        lambda model, out, good, files, data: [
            "-m",
            "kvshrink.decode_bench",
            str(model),
            str(good),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        ("model", "out"),
    ),
    # The demo's model is the packaged SmolLM2 (its --model is a test hook): only --out is the user's.
    Command(
        "kvshrink_demo", lambda model, out, good, files, data: ["-m", "kvshrink.demo", "--out", str(out)], ("out",)
    ),
    Command(
        "uptrain.evaluate",
        lambda model, out, good, files, data: [
            "-m",
            "uptrain.evaluate",
            str(model),
            "--data",
            str(data or _text(files)),
            "--seq-len",
            "16",
        ],
        ("model", "data"),
    ),
    Command(
        "uptrain.sample",
        lambda model, out, good, files, data: [
            "-m",
            "uptrain.sample",
            str(model),
            str(files / "samples.jsonl"),
            "--tokens",
            "8",
        ],
        ("model",),
    ),
    Command(
        "uptrain",
        lambda model, out, good, files, data: ["-m", "uptrain", str(_recipe(model, out, files, data or _text(files)))],
        ("model", "out", "data"),
    ),
    Command(
        "uptrain lora",
        lambda model, out, good, files, data: [
            "-m",
            "uptrain",
            str(_recipe(model, out, files, data or _text(files), **LORA)),
        ],
        ("model", "out", "data"),
    ),
    Command(
        "uptrain offline teacher",
        lambda model, out, good, files, data: [
            "-m",
            "uptrain",
            str(
                _recipe(
                    model,
                    out,
                    files,
                    data or _text(files),
                    teacher=str(good),
                    distill={"weight": 0.5, "mode": "offline", "top_k": 4},
                )
            ),
        ],
        ("model", "out", "data"),
    ),
    Command(
        "uptrain --dry-run",
        lambda model, out, good, files, data: [
            "-m",
            "uptrain",
            str(_recipe(model, out, files, data or _text(files), **LORA)),
            "--dry-run",
        ],
        ("model", "out", "data"),
    ),
    Command(
        "uptrain.merge",
        lambda model, out, good, files, data: ["-m", "uptrain.merge", str(_adapter(good, files)), str(model), str(out)],
        ("model", "out"),
    ),
]


def _adapter(good: Path, files: Path) -> Path:
    """A LoRA adapter (peft's format) of the good checkpoint, for uptrain.merge."""
    from transformers import AutoModelForCausalLM

    from uptrain.adapters import add_adapters
    from uptrain.recipe import Lora

    add_adapters(AutoModelForCausalLM.from_pretrained(good), Lora(r=2)).save_pretrained(files / "adapter")
    return files / "adapter"


LORA = {"train": {"trainable": "none"}, "lora": {"r": 2, "targets": ["q", "o"]}}


def sweep() -> list[tuple[Command, BadInput]]:
    """Every (command, case) pair that applies, for ``pytest.mark.parametrize``."""
    return [(command, case) for command in COMMANDS for case in CASES if case.role in command.roles]


def default_sigint() -> None:
    """In the child before it starts: SIGINT back to its default, for a suite launched in the background
    (``cmd &`` starts with SIGINT ignored, which Python then keeps: Ctrl-C would not interrupt it)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
