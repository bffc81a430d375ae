"""The bad-input matrix every command of the project is swept with (``tests/test_bad_inputs.py``).

The cases are those ``python -m convert`` is tested on (``tests/test_cli.py``): a model path that is missing, a
file, not a checkpoint, with an unreadable config or no weights, a truncated or corrupt safetensors file; an
output that is an existing file or lies below one (the OS refuses that even to root, who may write anywhere
else). Each command's expected behaviour is the same: exactly one stderr line starting ``error: ``, exit code
2, no traceback, nothing created. A command joins by adding an entry to ``COMMANDS``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class BadInput:
    """One bad argument: ``make(tmp, good)`` builds it from a scratch folder and a good checkpoint."""

    name: str
    role: str  # "model" (a checkpoint argument) or "out" (an output directory argument)
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
]


@dataclass(frozen=True)
class Command:
    """A CLI under the sweep: ``argv(model, out, good, files)`` -> the arguments after ``python``; ``files`` is a
    folder for what the command reads besides (text, a recipe), written before the sweep looks for new files."""

    name: str
    argv: Callable[[Path, Path, Path, Path], list[str]]
    roles: tuple[str, ...]  # which of the matrix's roles the command has


def _text(files: Path) -> Path:
    path = files / "text.txt"
    path.write_text("Some text to score.\n\nAnd a second paragraph of it.\n")
    return path


def _recipe(model: Path, out: Path, files: Path) -> Path:
    recipe = {"model": str(model), "output_dir": str(out), "data": {"train": [str(_text(files))], "seq_len": 16}}
    path = files / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


COMMANDS = [
    Command("convert", lambda model, out, good, files: ["-m", "convert", str(model), str(out), "--kv-heads", "1"],
            ("model", "out")),
    Command("decode_bench", lambda model, out, good, files: ["-m", "kvshrink.decode_bench", str(model), str(good),
                                                             "--out", str(out), "--device", "cpu"], ("model", "out")),
    # The demo's model is the packaged SmolLM2 (its --model is a test hook): only --out is the user's.
    Command("kvshrink_demo", lambda model, out, good, files: ["-m", "kvshrink.demo", "--out", str(out)], ("out",)),
    Command("uptrain.evaluate", lambda model, out, good, files: ["-m", "uptrain.evaluate", str(model), "--data",
                                                                 str(_text(files))], ("model",)),
    Command("uptrain.sample", lambda model, out, good, files: ["-m", "uptrain.sample", str(model),
                                                               str(files / "samples.jsonl"), "--tokens", "8"],
            ("model",)),
    Command("uptrain", lambda model, out, good, files: ["-m", "uptrain", str(_recipe(model, out, files))],
            ("model", "out")),
]


def sweep() -> list[tuple[Command, BadInput]]:
    """Every (command, case) pair that applies, for ``pytest.mark.parametrize``."""
    return [(command, case) for command in COMMANDS for case in CASES if case.role in command.roles]


def default_sigint() -> None:
    """In the child before it starts: SIGINT back to its default, for a suite launched in the background
    (``cmd &`` starts with SIGINT ignored, which Python then keeps: Ctrl-C would not interrupt it)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
