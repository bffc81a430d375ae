"""A plain (non-editable) `pip install .` carries what the commands need at run time: the recipes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
# The venv sees the system site-packages (torch and the rest), where the suite's own editable install of this
# project also lives; its import hook is switched off so that only the wheel installed in the venv can answer.
NO_EDITABLE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}


def test_non_editable_install_finds_the_demo_recipe_from_anywhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    # What `pip install .` does, offline: build the wheel (with this interpreter's setuptools; the venv's own
    # may be too old), install it; torch and the rest come from the system site-packages.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("kvshrink-*.whl"))
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (NO_EDITABLE + "import kvshrink.demo.demo as d, yaml; print(d.RECIPE); "
             "print(yaml.safe_load(d.RECIPE.read_text())['train']['trainable'])")
    found = subprocess.run([str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                           env=ENV)
    assert found.returncode == 0, found.stderr[-2000:]
    recipe, trainable = found.stdout.split()
    assert Path(recipe).is_relative_to(venv) and Path(recipe).read_text() == (ROOT / "recipes" / Path(recipe).name).read_text()
    assert trainable == "attention"
    fsdp = venv.glob("lib/python*/site-packages/kvshrink_recipes/accelerate/fsdp.yaml")
    assert next(fsdp).read_text() == (ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text()
    template = subprocess.run([str(python), "-c", NO_EDITABLE + "import importlib.resources as r, kvshrink.demo; "
                               "print(r.files(kvshrink.demo) / 'verse_cloze.yaml')"],
                              cwd=elsewhere, capture_output=True, text=True, timeout=300, env=ENV)
    shipped = Path(template.stdout.strip())  # the verse cloze task's template (kvshrink.demo.cloze)
    assert shipped.is_relative_to(venv) and shipped.read_text() == (ROOT / "kvshrink" / "demo" / "verse_cloze.yaml").read_text()
    helped = subprocess.run([str(python), "-c", NO_EDITABLE + "import runpy, sys; sys.argv[1:] = ['--help']; "
                             "runpy.run_module('kvshrink.demo', run_name='__main__')"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=300, env=ENV)
    assert helped.returncode == 0 and "usage" in helped.stdout
