"""A plain (non-editable) `pip install .` carries what the commands need at run time: the recipes, the demo's
task template, the moved packages (kvshrink.demo, kvshrink.decode_bench) and the `kvshrink` console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# The venv sees the system site-packages (torch and the rest), where the suite's own editable install of this
# project also lives; its import hook is switched off so that only the wheel installed in the venv can answer.
NO_EDITABLE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the project's wheel installed in it, once for this module."""
    tmp_path = tmp_path_factory.mktemp("install")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # What `pip install .` does, offline: build the wheel (with this interpreter's setuptools; the venv's own
    # may be too old), install it; torch and the rest come from the system site-packages.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("kvshrink-*.whl"))
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--ignore-installed",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


def run_in(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by the venv's python in ``cwd``, with the editable install's import hook switched off."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", NO_EDITABLE + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
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
    helped = run_in(
        venv,
        "import runpy, sys; sys.argv[1:] = ['--help']; runpy.run_module('kvshrink.demo', run_name='__main__')",
        elsewhere,
    )
    assert helped.returncode == 0 and "usage" in helped.stdout


def test_non_editable_install_ships_the_moved_packages_and_not_the_old_names(venv, tmp_path):
    probe = (
        "import importlib.util as u, kvshrink.demo.cloze, kvshrink.decode_bench.cli, uptrain.decoding.mha_twin; "
        "print(kvshrink.decode_bench.cli.__file__); print(kvshrink.demo.cloze.__file__); "
        "print(u.find_spec('kvshrink_demo'), u.find_spec('decode_bench'))"
    )
    found = run_in(venv, probe, tmp_path)
    assert found.returncode == 0, found.stderr[-2000:]
    decode_bench, cloze, old = found.stdout.splitlines()
    assert Path(decode_bench).is_relative_to(venv) and Path(cloze).is_relative_to(venv)
    assert old == "None None"  # no shims: the old top-level names are gone
    helped = run_in(
        venv,
        "import runpy, sys; sys.argv[1:] = ['--help']; runpy.run_module('kvshrink.decode_bench', run_name='__main__')",
        tmp_path,
    )
    assert helped.returncode == 0 and "usage: python -m kvshrink.decode_bench" in helped.stdout


def kvshrink_script(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``kvshrink`` console script run with ``args`` (through the venv's python, so that the
    editable install's hook can be switched off first)."""
    script = venv / "bin" / "kvshrink"
    assert script.is_file(), "pip install . made no kvshrink console script"
    return run_in(
        venv,
        f"import runpy, kvshrink.cli; assert kvshrink.cli.__file__.startswith({str(venv)!r}); "
        f"sys.argv[:] = {[str(script), *args]!r}; runpy.run_path({str(script)!r}, run_name='__main__')",
        cwd,
    )


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
    """A moved or renamed command module breaks ``kvshrink NAME`` here, not at a user's prompt."""
    import importlib

    from kvshrink.cli import SUBCOMMANDS

    for command in SUBCOMMANDS:
        assert callable(getattr(importlib.import_module(command.module), "main", None)), command
