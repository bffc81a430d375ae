"""Every command, run as a user runs it (a subprocess), on the bad-input matrix of ``tests/badinputs.py``:
exactly one stderr line ``error: ...`` naming the path and the problem, exit code 2, no traceback, nothing
created (not beside the bad path, not in the working directory)."""

import os
import subprocess
import sys

import pytest
from badinputs import needs_reader, sweep
from textlm import make_lm, train_tokenizer, write_corpus
from tiny import make_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "llama"
    make_model("llama", 4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good_lm(tmp_path_factory):
    """A checkpoint with its tokenizer, for the data cases: a command may load the tokenizer before the text."""
    root = tmp_path_factory.mktemp("lm")
    train, _ = write_corpus(root / "text")
    return make_lm(root / "lm", train_tokenizer(train))


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, case", sweep(), ids=lambda x: x.name)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(command, case, good, good_lm, tmp_path):
    if needs_reader(case):
        pytest.skip("running as root, whom a mode-000 file does not stop")
    good = good_lm if case.role == "data" else good
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    bad = case.make(scratch, good)
    model, out, data = {
        "model": (bad, scratch / "out", None),
        "out": (good, bad, None),
        "data": (good, scratch / "out", bad),
    }[case.role]
    files = tmp_path / "files"
    files.mkdir()
    argv = command.argv(model, out, good, files, data)
    before = tree(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", KVSHRINK_CACHE=str(scratch / "cache"))
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert any(words in err for words in case.says), err
    assert str(bad.parent if case.name == "output below a file" else bad) in err, err  # names the path
    assert tree(tmp_path) == before  # nothing created: no OUTPUT, no temporary sibling, no runs/ in cwd
