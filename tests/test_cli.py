"""The command line: bad input gets one clear line, exit code 2, and nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badinputs import default_sigint
from safetensors.torch import save_file
from tiny import make_model

from convert.cli import main
from convert.merge import METHODS
from uptrain.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_model("llama", 4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    make_model("llama", 4).save_pretrained(path, max_shard_size="40KB")
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _run_error(capsys, tmp_path, argv, expected):
    """Run the CLI on bad input: exit 2, one line naming the problem, OUTPUT not created."""
    out = tmp_path / "out"
    assert main([str(a) for a in argv[:1]] + [str(out)] + [str(a) for a in argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_cli_converts_and_prints_report(good, tmp_path, capsys):
    assert main([str(good), str(tmp_path / "out"), "--kv-heads", "2"]) == 0
    text = capsys.readouterr().out
    for fragment in ("all 2 layers: 4 -> 2", "KV cache / token", "2.0x smaller", "4k ctx", "parameters", "time"):
        assert fragment in text, fragment


def test_cli_dry_run(good, tmp_path, capsys):
    assert main([str(good), str(tmp_path / "out"), "--kv-heads", "1", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "n, expected",
    [
        ("0", "positive integer"),
        ("8", "more than the 4 KV heads"),
        ("3", "does not divide the 4 KV heads of the source; choose one of 1, 2, 4"),
    ],
)
def test_bad_kv_heads(good, tmp_path, capsys, n, expected):
    _run_error(capsys, tmp_path, [good, "--kv-heads", n], expected)


@pytest.mark.parametrize("model_type", ["gpt_neox", "opt", "gptj", "t5", "bloom", "bert"])
def test_unknown_family(good, tmp_path, capsys, model_type):
    src = _copy(good, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type=model_type, architectures=["SomethingElse"])
    (src / "config.json").write_text(json.dumps(config))
    _run_error(
        capsys,
        tmp_path,
        [src, "--kv-heads", "1"],
        f"model type '{model_type}' is not supported; "
        "supported families: cohere, falcon, gemma, gemma2, gpt2, gpt_bigcode, granite, llama",
    )


def test_missing_and_unreadable_config(good, tmp_path, capsys):
    src = _copy(good, tmp_path)
    (src / "config.json").unlink()
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "has no config.json")
    (src / "config.json").write_text("{not json")
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "cannot read")


def test_missing_source_and_missing_weights(good, tmp_path, capsys):
    _run_error(capsys, tmp_path, [tmp_path / "nowhere", "--kv-heads", "1"], "does not exist")
    src = _copy(good, tmp_path)
    (src / "model.safetensors").unlink()
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "has no model.safetensors")


def test_hub_id_offline(tmp_path, capsys):
    _run_error(
        capsys,
        tmp_path,
        ["some-org/some-model", "--kv-heads", "1"],
        "is not a local directory and could not be fetched from the hub",
    )


def _edit_index(src, edit):
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_outside_source_and_missing_shard(sharded, tmp_path, capsys):
    src = _copy(sharded, tmp_path)
    name = next(iter(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]))
    _edit_index(src, lambda m: m.update({name: "../elsewhere.safetensors"}))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "names a file outside the checkpoint")
    _edit_index(src, lambda m: m.update({name: "/etc/passwd"}))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "names a file outside the checkpoint")
    _edit_index(src, lambda m: m.update({name: "model-00009-of-00009.safetensors"}))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "which is missing")


def test_index_disagrees_with_shards(sharded, tmp_path, capsys):
    src = _copy(sharded, tmp_path)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(iter(weight_map))
    _edit_index(src, lambda m: m.pop(name))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "missing from model.safetensors.index.json")
    _edit_index(src, lambda m: m.update({name: weight_map[name], "model.ghost.weight": weight_map[name]}))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "not in their shard")


def test_truncated_and_corrupt_safetensors(good, tmp_path, capsys):
    src = _copy(good, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "is truncated")
    (src / "model.safetensors").write_bytes(data[:8] + b"}" + data[9:])
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "is corrupt")
    (src / "model.safetensors").write_bytes(b"\x05")
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "truncated or not a safetensors file")


def test_shape_mismatch_against_config(good, tmp_path, capsys):
    src = _copy(good, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["num_key_value_heads"] = 2  # the weights have 4
    (src / "config.json").write_text(json.dumps(config))
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "config.json implies")


def test_missing_attention_tensor(good, tmp_path, capsys):
    src = _copy(good, tmp_path)
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "has no model.layers.1.self_attn.v_proj.weight")


def test_pickle_refused_without_flag(good, tmp_path, capsys):
    src = _copy(good, tmp_path)
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    _run_error(capsys, tmp_path, [src, "--kv-heads", "1"], "pass --allow-pickle")


def test_existing_output_and_overlap(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main([str(good), str(out), "--kv-heads", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    src = _copy(good, tmp_path)
    assert main([str(src), str(src), "--kv-heads", "1", "--overwrite"]) == 2
    assert "overlaps SOURCE" in capsys.readouterr().err
    assert (src / "model.safetensors").exists()


def test_module_entry_point_exit_code(tmp_path):
    """`python -m convert` itself: exit 2, one line on stderr, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "convert", str(tmp_path / "none"), str(tmp_path / "out"), "--kv-heads", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


_SLOW_CONVERT = """
import os, pathlib, sys, time
import convert.plan as plan
real = plan.write_tensor_bytes
def slow(tensor, out):  # after the first tensor: say so, then stall (the conversion cannot end on its own)
    real(tensor, out)
    pathlib.Path(os.environ["KVSHRINK_TEST_MARKER"]).touch()
    time.sleep(60)
plan.write_tensor_bytes = slow
from convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL", "SIGINT"])
def test_killed_conversion_leaves_no_checkpoint_looking_output(good, tmp_path, sig):
    import signal
    import time

    out, marker = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-first-tensor-written"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(good), str(out), "--kv-heads", "1", "--dtype", "bfloat16"],
        env=dict(os.environ, HF_HUB_OFFLINE="1", KVSHRINK_TEST_MARKER=str(marker)),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.tmp-*/model.safetensors")), "no temporary output being written"
    assert proc.poll() is None, "conversion ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    if sig == "SIGKILL":  # nothing can clean up after SIGKILL: only a hidden temporary sibling remains
        assert all(p.name.startswith(".out.tmp-") for p in leftovers)
    else:
        assert leftovers == [] and "interrupted" in proc.stderr.read()


def _shown_method_help() -> str:
    """The help of --method in ``python -m convert --help``, on one line."""
    done = subprocess.run(
        [sys.executable, "-m", "convert", "--help"],
        env=dict(os.environ, COLUMNS="100000"),  # no wrapping (textwrap would break at hyphens)
        capture_output=True,
        text=True,
        check=True,
    )
    options = " ".join(done.stdout.split("options:", 1)[1].split())
    return options.split(" --method ", 1)[1].split(" --grouping ", 1)[0]


def _docs_methods_table() -> dict[str, tuple[str, str]]:
    """docs/convert.md's methods table: method -> (what each new K/V head is, the projections it changes)."""
    text = (Path(__file__).parents[1] / "docs" / "convert.md").read_text()
    section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1].replace("`", ""), cells[2])  # markdown's code quotes aside
    return rows


def test_method_help_shows_each_registered_help_once():
    """``--method``'s help is the registry's: every method's ``help``, once, in the registry's order."""
    shown = _shown_method_help()
    expected = ". ".join(f"{name}: {merge.help}" for name, merge in METHODS.items())
    assert expected in shown
    for name, merge in METHODS.items():
        assert shown.count(merge.help) == 1, name
    calibrated = [name for name, merge in METHODS.items() if merge.calibrated]
    assert f"{' and '.join(calibrated)} run the source on --calibration-data or, without it, on text sampled" in shown


def test_recipe_error_for_an_unknown_method_names_the_registered_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: m\noutput_dir: out\ndata: {train: [a.txt]}\nconvert: {source: s, kv_heads: 1, method: nope}\n"
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert str(caught.value) == f"convert.method: 'nope' is not one of {', '.join(METHODS)}"


def test_docs_methods_table_shows_each_registered_help():
    """docs/convert.md's methods table lists the registered methods in order, each with its ``help`` as what a
    merged head is and its ``changes`` as the projections it rewrites: a help edited in one place fails here."""
    table = _docs_methods_table()
    assert list(table) == list(METHODS)
    for name, merge in METHODS.items():
        what, changes = table[name]
        assert what == merge.help, name
        assert {p.strip().lower() for p in changes.split(",")} == set(merge.changes), name
