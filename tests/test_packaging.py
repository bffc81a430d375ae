"""A plain (non-editable) `pip install .` carries what the commands need at run time: the recipes, the demo's
task template, the application packages (kvshrink.demo, kvshrink.decode_bench) and the `kvshrink` console script.

The venv the project is installed into sees exactly this interpreter's import path, wherever the suite's
dependencies live (the system Python, a venv, a user site): a .pth file in the venv's site-packages lists
``sys.path``, less the source tree and the standard library. The lines of a .pth file are plain paths, so the
.pth files in those directories are not run, among them the import hook of this project's own editable
install: only the copy installed in the venv can answer an import of the project."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


def outer_import_path() -> list[str]:
    """This interpreter's import path as directories, less the source tree (and the tests under it), the
    current directory and the standard library, which the venv's interpreter has of its own."""
    stdlib = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}
    stdlib |= {lib / "lib-dynload" for lib in stdlib}
    kept: list[str] = []
    for entry in sys.path:
        path = Path(entry).resolve() if entry else ROOT
        if path.is_dir() and not path.is_relative_to(ROOT) and path not in stdlib and str(path) not in kept:
            kept.append(str(path))
    return kept


def source_copy(destination: Path) -> Path:
    """The files a clone holds, copied to ``destination``: no build leftovers, caches or venvs, so that the
    wheel holds only what the source does, and the build writes nothing into the source tree."""

    def ignored(folder: str, names: list[str]) -> set[str]:
        generated = {"__pycache__", "build", "dist", "runs", *(["out"] if Path(folder) == ROOT / "bench" else [])}
        return {
            n
            for n in names
            if n.startswith(".") or n in generated or n.endswith(".egg-info") or Path(folder, n, "pyvenv.cfg").exists()
        }

    return Path(shutil.copytree(ROOT, destination, ignore=ignored))


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the project installed in it by `pip install .`, once for this module."""
    tmp_path = tmp_path_factory.mktemp("install")
    venv = tmp_path / "venv"
    # pip and setuptools come from this interpreter's path (the test extra holds setuptools); a venv of its own
    # pip only where this interpreter has none.
    has_pip = importlib.util.find_spec("pip") is not None
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if has_pip else []), str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "outer_import_path.pth").write_text("".join(f"{p}\n" for p in outer_import_path()))
    # What `pip install .` does, offline: no build isolation (setuptools is already here), no dependencies
    # (they are on the outer path); --ignore-installed leaves alone the editable install the outer path shows.
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--ignore-installed",
            "--disable-pip-version-check",
            str(source_copy(tmp_path / "source")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


def command(venv: Path, line: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``line`` (``python -m NAME`` or ``kvshrink``) with ``args``, run in ``cwd`` as a user runs it in the
    activated venv: its bin/ first on PATH."""
    active = ENV | {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*line.split(), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=active)


def run_in(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by the venv's python in ``cwd``."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV
    )


def test_non_editable_install_finds_the_demo_recipe_from_anywhere(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import kvshrink.demo.demo as d, yaml; print(d.RECIPE); "
        "print(yaml.safe_load(d.RECIPE.read_text())['train']['trainable'])"
    )
    found = run_in(venv, probe, elsewhere)
    assert found.returncode == 0, found.stderr[-2000:]
    recipe, trainable = found.stdout.split()
    assert (
        Path(recipe).is_relative_to(venv)
        and Path(recipe).read_text() == (ROOT / "recipes" / Path(recipe).name).read_text()
    )
    assert trainable == "attention"
    fsdp = venv.glob("lib/python*/site-packages/kvshrink_recipes/accelerate/fsdp.yaml")
    assert next(fsdp).read_text() == (ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text()
    template = run_in(
        venv,
        "import importlib.resources as r, kvshrink.demo; print(r.files(kvshrink.demo) / 'verse_cloze.yaml')",
        elsewhere,
    )
    shipped = Path(template.stdout.strip())  # the verse cloze task's template (kvshrink.demo.cloze)
    assert (
        shipped.is_relative_to(venv)
        and shipped.read_text() == (ROOT / "kvshrink" / "demo" / "verse_cloze.yaml").read_text()
    )


def test_non_editable_install_ships_the_applications_and_no_top_level_demo_or_bench(venv, tmp_path):
    probe = (
        "import importlib.util as u, kvshrink.demo.cloze, kvshrink.decode_bench.cli, uptrain.decoding.mha_twin; "
        "print(kvshrink.decode_bench.cli.__file__); print(kvshrink.demo.cloze.__file__); "
        "print(u.find_spec('kvshrink_demo'), u.find_spec('decode_bench'))"
    )
    found = run_in(venv, probe, tmp_path)
    assert found.returncode == 0, found.stderr[-2000:]
    decode_bench, cloze, old = found.stdout.splitlines()
    assert Path(decode_bench).is_relative_to(venv) and Path(cloze).is_relative_to(venv)
    assert old == "None None"  # kvshrink_demo and decode_bench are not importable: one name per module
    helped = command(venv, "python -m kvshrink.decode_bench", ["--help"], tmp_path)
    assert helped.returncode == 0 and "usage: python -m kvshrink.decode_bench" in helped.stdout


# What a user runs, and the start of the usage line each prints for --help.
COMMANDS = {
    "python -m convert": "usage: python -m convert ",
    "python -m uptrain": "usage: python -m uptrain ",
    "python -m uptrain.evaluate": "usage: python -m uptrain.evaluate ",
    "python -m kvshrink.demo": "usage: python -m kvshrink.demo ",
    "kvshrink": "usage: kvshrink ",
}
# The modules behind them: none may come from the source tree.
MODULES = (
    "convert.__main__",
    "convert.cli",
    "uptrain.__main__",
    "uptrain.evaluate",
    "kvshrink.demo.__main__",
    "kvshrink.cli",
    "kvshrink_base",
    "kvshrink_recipes",
)


def test_each_command_runs_from_another_directory(venv, tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    for line, usage in COMMANDS.items():
        helped = command(venv, line, ["--help"], tmp_path)
        assert helped.returncode == 0, (line, helped.stderr[-2000:])
        assert helped.stdout.startswith(usage), (line, helped.stdout[:200])


def test_the_commands_import_the_installed_copy(venv, tmp_path):
    probe = (
        "import importlib.util, json, sys; "
        f"print(json.dumps([sys.path, [importlib.util.find_spec(m).origin for m in {MODULES!r}]]))"
    )
    found = command(venv, "python -c", [probe], tmp_path)
    assert found.returncode == 0, found.stderr[-2000:]
    path, origins = json.loads(found.stdout)
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(ROOT)], path
    assert all(Path(origin).is_relative_to(venv) for origin in origins), origins
    shebang = (venv / "bin" / "kvshrink").read_text().splitlines()[0]
    assert Path(shebang.removeprefix("#!")).parent == venv / "bin", shebang


def test_convert_converts_a_checkpoint_from_another_directory(venv, tmp_path):
    """Mean pooling of a tiny checkpoint, by ``python -m convert`` and by ``kvshrink convert``: the same
    result, an MQA checkpoint."""
    source = tmp_path / "source"
    make_model("llama", 4).save_pretrained(source)
    for line, out in (("python -m convert", "by-module"), ("kvshrink convert", "by-script")):
        done = command(venv, line, [str(source), out, "--kv-heads", "1"], tmp_path)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert "all 2 layers: 4 -> 1" in done.stdout, (line, done.stdout)
        assert json.loads((tmp_path / out / "config.json").read_text())["num_key_value_heads"] == 1
    by_module, by_script = (load_file(tmp_path / out / "model.safetensors") for out in ("by-module", "by-script"))
    assert by_module.keys() == by_script.keys()
    assert all(by_module[name].equal(by_script[name]) for name in by_module)
    assert by_module["model.layers.0.self_attn.k_proj.weight"].shape == (8, 64)  # one KV head of head_dim 8


def kvshrink_script(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``kvshrink`` console script run with ``args`` in ``cwd``."""
    assert (venv / "bin" / "kvshrink").is_file(), "pip install . made no kvshrink console script"
    return command(venv, "kvshrink", args, cwd)


def test_the_console_script_runs_each_subcommand_help(venv, tmp_path):
    listed = kvshrink_script(venv, ["--help"], tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in ("convert", "uptrain", "evaluate", "sample", "merge", "decode-bench", "demo"):
        assert sum(line.split()[:1] == [name] for line in listed.stdout.splitlines()) == 1, listed.stdout
    converting = kvshrink_script(venv, ["convert", "--help"], tmp_path)
    assert converting.returncode == 0 and "--kv-heads" in converting.stdout, converting.stderr[-2000:]
    demo = kvshrink_script(venv, ["demo", "--help"], tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert demo.stdout.startswith("usage: kvshrink demo "), demo.stdout[:200]  # its prog, passed through


def test_the_console_script_refuses_an_unknown_or_missing_subcommand(venv, tmp_path):
    unknown = kvshrink_script(venv, ["frobnicate", "--help"], tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert len(unknown.stderr.splitlines()) == 1 and "invalid choice: 'frobnicate'" in unknown.stderr
    bare = kvshrink_script(venv, [], tmp_path)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: kvshrink ")


def test_every_subcommand_names_a_module_with_a_main():
    """A command module that is not where the console script looks breaks ``kvshrink NAME`` here, not at a
    user's prompt."""
    import importlib

    from kvshrink.cli import SUBCOMMANDS

    for command in SUBCOMMANDS:
        assert callable(getattr(importlib.import_module(command.module), "main", None)), command
