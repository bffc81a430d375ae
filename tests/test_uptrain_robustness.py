"""The uptrainer and the evaluator as a new user meets them: bad inputs get one line and exit 2 with
nothing left behind, packing keeps every token, Ctrl-C names the checkpoint to resume from, tied weights are
saved without a warning and stay tied, checkpoints stay bounded on disk."""

import itertools
import json
import math
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import datasets
import pytest
import yaml
from accelerate import Accelerator
from badinputs import default_sigint
from safetensors import safe_open
from test_uptrain import setup, write_recipe  # noqa: F401  (the module fixture is shared)

from uptrain.__main__ import main as uptrain_main
from uptrain.data import pack
from uptrain.evaluate import main as evaluate_main
from uptrain.recipe import RecipeError, Save, load_recipe, schedule
from uptrain.train import run

RECIPES = Path(__file__).parents[1] / "recipes"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def error_line(capsys) -> str:
    """The error line after the data library's progress bars (stderr), with no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


# 1. evaluate's settings


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "0"], "--seq-len must be positive, got 0"),
        (["--seq-len", "9000"], "--seq-len 9000 is beyond the model's 128 positions; use at most 128"),
        (["--max-tokens", "0"], "--max-tokens must be positive, got 0"),
        (["--batch-size", "-1"], "--batch-size must be positive, got -1"),
    ],
)
def test_evaluate_refuses_settings_that_cannot_run(setup, capsys, flags, message):
    _, held, _, mqa = setup
    assert evaluate_main([str(mqa), "--data", str(held), *flags]) == 2
    assert one_line(capsys) == f"error: {message}"


def test_evaluate_help_is_plain_and_every_option_explained(capsys):
    """No reST markup in the description; every option has a help text (argparse prints it after two spaces on
    the option's line, or on the next, indented, line)."""
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    lines = text.split("options:")[1].splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  -")]
    assert len(options) == 12  # -h and the eleven flags (perplexity, downstream tasks, the report)
    for i in options:
        same_line = "  " in lines[i].strip()
        next_line = i + 1 < len(lines) and lines[i + 1].startswith(" " * 6)
        assert same_line or next_line, lines[i]


def test_evaluate_ctrl_c_is_one_line(setup, capsys, monkeypatch):
    import uptrain.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(uptrain.evaluate, "perplexity", interrupted)
    assert evaluate_main([str(setup[3]), "--data", str(setup[1]), "--seq-len", "64"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"


# 2. model paths: missing, not a checkpoint, truncated weights, the template as shipped


def _bad_model(kind: str, setup, tmp_path: Path) -> tuple[Path, str]:
    """(model path, the message expected) for one kind of bad model directory."""
    if kind == "missing":
        return tmp_path / "nowhere" / "model", f"{tmp_path / 'nowhere' / 'model'}: no such directory"
    if kind == "not-a-checkpoint":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "README.txt").write_text("hello")
        return tmp_path / "notes", f"{tmp_path / 'notes'} is not a Hugging Face checkpoint (no config.json)"
    if kind == "file":
        (tmp_path / "model.safetensors").write_bytes(b"x")
        return (
            tmp_path / "model.safetensors",
            f"{tmp_path / 'model.safetensors'} is a file; give the checkpoint's directory",
        )
    copy = shutil.copytree(setup[3], tmp_path / "broken")
    data = (copy / "model.safetensors").read_bytes()
    if kind == "corrupt":
        (copy / "model.safetensors").write_bytes(data[:8] + b"}" + data[9:])
        return copy, f"{copy / 'model.safetensors'} is corrupt: its header is not valid JSON"
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    return (
        copy,
        f"{copy / 'model.safetensors'} is truncated: header describes {len(data)} bytes, file has {len(data) // 2}",
    )


@pytest.mark.parametrize("kind", ["missing", "file", "not-a-checkpoint", "truncated", "corrupt"])
def test_bad_model_is_one_line_for_uptrain_and_evaluate(setup, tmp_path, capsys, kind):
    model, message = _bad_model(kind, setup, tmp_path)
    assert evaluate_main([str(model), "--data", str(setup[1]), "--seq-len", "64"]) == 2
    assert one_line(capsys) == f"error: {message}"
    out = tmp_path / "runs" / "x"
    assert uptrain_main([str(write_recipe(tmp_path / "r.yaml", setup, out, model=str(model)))]) == 2
    assert one_line(capsys) == f"error: model {message}"
    teacher = write_recipe(tmp_path / "t.yaml", setup, out, teacher=str(model), distill={"weight": 0.5})
    assert uptrain_main([str(teacher)]) == 2
    assert one_line(capsys) == f"error: teacher {message}"
    assert not (tmp_path / "runs").exists()


def test_no_tokenizer_and_an_uncached_hub_name_offline(setup, tmp_path, capsys, monkeypatch):
    """A checkpoint saved without its tokenizer is named as such (not transformers' cut-off "Couldn't
    instantiate the backend tokenizer from one of: "); `runs/x`, which could be a hub id, is no such directory
    when the hub is offline and its cache does not have it."""
    monkeypatch.chdir(tmp_path)
    bare = shutil.copytree(setup[3], tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    for model, message in (
        (
            bare,
            f"{bare} has no tokenizer (no tokenizer.json, tokenizer_config.json, "
            "tokenizer.model, vocab.json): save the tokenizer of the model it came from into it",
        ),
        ("runs/x", "runs/x: no such directory (nor a hub model in the cache; HF_HUB_OFFLINE is set)"),
    ):
        assert evaluate_main([str(model), "--data", str(setup[1]), "--seq-len", "64"]) == 2
        assert one_line(capsys) == f"error: {message}"
        recipe = write_recipe(tmp_path / "r.yaml", setup, tmp_path / "out", model=str(model))
        assert uptrain_main([str(recipe)]) == 2
        assert error_line(capsys).endswith(message)
        assert not (tmp_path / "out").exists()


def test_template_recipe_as_shipped_names_its_placeholder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert uptrain_main([str(RECIPES / "template.yaml")]) == 2
    assert one_line(capsys) == "error: model path/to/converted: no such directory"
    assert list(tmp_path.iterdir()) == []  # no runs/template


# 3. Ctrl-C


_STALL_AFTER_STEP_4 = """
import sys, time
from uptrain import train
real = train._Loop.save
def save(self):
    real(self)
    if self.step >= 4:
        time.sleep(60)
train._Loop.save = save
from uptrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_names_the_last_checkpoint_and_the_command_resumes(setup, tmp_path):
    """A real SIGINT once step-4 is saved: one line naming the newest complete checkpoint and the command,
    exit 130, no traceback; that command resumes from it and finishes."""
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        setup,
        out,
        train={"max_steps": 16},
        eval={"every_steps": 16},
        save={"every_steps": 4, "keep_last": 5},
    )
    # python -m uptrain whose saves from step 4 on stall, so that the signal lands mid-run however loaded the
    # machine (the printed command is built from the arguments, so it is the plain one)
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALL_AFTER_STEP_4, str(recipe), "log.every_steps=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 4"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and not (out / "final").exists()
    line = stderr.strip().splitlines()[-1]
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    prefix = (
        f"error: interrupted; the last complete checkpoint is {out / 'checkpoints' / f'step-{last}'}; resume with: "
    )
    assert line.startswith(prefix), line
    command = shlex.split(line.removeprefix(prefix))
    assert command == ["python", "-m", "uptrain", str(recipe), "log.every_steps=1"]
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from step-{last}" in done.stdout
    assert json.loads((out / "checkpoints" / "step-16" / "trainer_state.json").read_text()) == {"step": 16}
    assert (out / "final" / "model.safetensors").exists()


# 4. packing


class _WordTokenizer:
    """Each whitespace-separated integer is one token id; EOS is 0."""

    eos_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


@pytest.mark.parametrize("seq_len, batch_size", [(7, 20), (64, 20), (1000, 20), (64, None)])
def test_packing_keeps_every_token_but_the_final_remainder(seq_len, batch_size):
    """2,500 documents of 0-29 tokens in map batches of 20 (about 300 tokens each) or of the default 1,000: the
    blocks are exactly the joined stream cut every seq_len tokens, including seq_len 1000, longer than a batch
    of 20; a stream packs the same, and the same again on a second pass."""
    rng = random.Random(0)
    docs = [" ".join(str(rng.randrange(1, 500)) for _ in range(rng.randrange(0, 30))) for _ in range(2500)]
    stream = list(itertools.chain.from_iterable([int(w) for w in d.split()] + [0] for d in docs))
    expected = [stream[i : i + seq_len] for i in range(0, len(stream) // seq_len * seq_len, seq_len)]
    assert len(stream) - len(expected) * seq_len < seq_len and len(expected) >= 30
    dataset = datasets.Dataset.from_dict({"text": docs})
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    assert [r["input_ids"] for r in pack(dataset, _WordTokenizer(), "text", seq_len, **sizes)] == expected
    streamed = pack(dataset.to_iterable_dataset(), _WordTokenizer(), "text", seq_len, **sizes)
    for _ in range(2):
        assert [r["input_ids"] for r in streamed] == expected


# 5. failed runs leave nothing; recipe typos are refused before any model loads


def test_failed_run_leaves_no_output_directory(setup, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    recipe = write_recipe(tmp_path / "r.yaml", setup, out, data={"eval": [str(tmp_path / "short.txt")]})
    (tmp_path / "short.txt").write_text("A few words only.")
    assert uptrain_main([str(recipe)]) == 2
    assert "the eval data gives no block of 64 tokens" in error_line(capsys)
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()  # a directory that was there before is left as it was
    recipe = write_recipe(tmp_path / "k.yaml", setup, tmp_path / "kept", data={"eval": [str(tmp_path / "short.txt")]})
    assert uptrain_main([str(recipe)]) == 2
    error_line(capsys)
    assert (tmp_path / "kept").is_dir()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=5e-4", "error: unknown recipe key train.lrr; valid keys in train: max_steps, "),
        ("train.lr=fast", "error: train.lr: expected float, got 'fast'"),
    ],
)
def test_override_typo_is_refused_before_any_model_loads(setup, tmp_path, capsys, monkeypatch, override, message):
    import uptrain.student

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(uptrain.student, "load_model", no_load)
    recipe = write_recipe(tmp_path / "r.yaml", setup, tmp_path / "out")
    assert uptrain_main([str(recipe), override]) == 2
    assert one_line(capsys).startswith(message)
    assert not (tmp_path / "out").exists()


# 6. paths in recipes


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "/xdg"},
        {"KVSHRINK_CACHE": "/data/kv"},
        {"KVSHRINK_CACHE": "/data/kv", "XDG_CACHE_HOME": "/xdg"},
    ],
)
def test_demo_recipe_reads_the_demo_cache(monkeypatch, env):
    """recipes/demo-smollm2-mqa.yaml run alone reads the samples and the tragedies where the demo's CPU branch
    writes them."""
    from kvshrink.assets import cache_dir
    from kvshrink.demo import demo

    for name in ("KVSHRINK_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recipe = load_recipe(RECIPES / "demo-smollm2-mqa.yaml")
    tokens_per_step, steps = schedule(recipe)
    name = demo.demo_sampling(tokens_per_step * steps, False).file_name()
    assert recipe.data.train == [str(cache_dir() / demo.SAMPLES_DIR / name)]
    assert recipe.data.eval == [str(cache_dir() / "shakespeare" / "eval.txt")]


def test_every_path_field_expands_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS", "/runs")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": "~/models/m",
                "teacher": "$RUNS/teacher",
                "output_dir": "${RUNS}/out",
                "resume": "${UNSET_HERE:-~/ckpt}",
                "data": {"train": ["~/a.txt", "${UNSET_HERE:-$RUNS}/b.txt"], "eval": ["$RUNS/e.txt"]},
            }
        )
    )
    r = load_recipe(recipe)
    home = str(Path.home())
    assert (r.model, r.teacher, r.output_dir, r.resume) == (
        f"{home}/models/m",
        "/runs/teacher",
        "/runs/out",
        f"{home}/ckpt",
    )
    assert (r.data.train, r.data.eval) == ([f"{home}/a.txt", "/runs/b.txt"], ["/runs/e.txt"])
    convert = load_recipe(recipe, ["model=null", "convert={source: '$RUNS/src', kv_heads: 1}"])
    assert convert.convert.source == "/runs/src"
    with pytest.raises(RecipeError, match=r"^output_dir: \$UNSET_HERE in '\$UNSET_HERE/out' is not set"):
        load_recipe(recipe, ["output_dir=$UNSET_HERE/out"])


# 7, 8, 9. tied weights, the console, disk


def test_tied_checkpoints_eval_lines_and_bounded_disk(setup, tmp_path, capsys, caplog, monkeypatch):
    """A tied model (tests/textlm.py ties lm_head to the embedding) checkpointed every 2 steps with the default
    save.keep_last, stopped at step 4 and resumed to step 8: no "Removed shared tensor" warning, the tie holds at
    every save (before and after resume), only the newest keep_last checkpoints stay, each costs 4 bytes per
    parameter of weights plus 8 of Adam moments, and every eval prints its perplexity and setting."""
    real_save, tied = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        model = self.unwrap_model(self._models[0])
        tied.append(model.lm_head.weight is model.get_input_embeddings().weight)
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    path = write_recipe(
        tmp_path / "r.yaml",
        setup,
        tmp_path / "run",
        eval={"every_steps": 4},
        save={"every_steps": 2},
        log={"every_steps": 2},
    )
    raw = yaml.safe_load(path.read_text())
    del raw["save"]["keep_last"]
    path.write_text(yaml.safe_dump(raw))
    caplog.set_level("WARNING")
    run(load_recipe(path, ["train.max_steps=4"]))
    first = capsys.readouterr().out
    run(load_recipe(path, ["train.max_steps=8"]))
    second = capsys.readouterr().out
    assert tied == [True] * 4 and "Removed shared tensor" not in caplog.text
    assert "resuming from step-4" in second
    checkpoints = tmp_path / "run" / "checkpoints"
    assert Save().keep_last == 2 and sorted(p.name for p in checkpoints.iterdir()) == ["step-6", "step-8"]

    with safe_open(checkpoints / "step-8" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        params = sum(math.prod(f.get_slice(n).get_shape()) for n in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    weights = (checkpoints / "step-8" / "model.safetensors").stat().st_size
    moments = (checkpoints / "step-8" / "optimizer.bin").stat().st_size
    assert 4 * params < weights < 4 * params * 1.02 and 8 * params < moments < 8 * params * 1.05

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and all(r["eval_tokens"] % 63 == 0 for r in evals)
    for r in evals:
        assert (
            f"step {r['step']}: eval perplexity {r['eval_ppl']:.2f} (loss {r['eval_loss']:.4f}) on "
            f"{r['eval_tokens']:,} tokens in 64-token blocks"
        ) in first + second
    steps = [line.split(":")[0] for line in (first + second).splitlines() if "tokens/s" in line]
    assert steps == ["step 2/4", "step 4/4", "step 6/8", "step 8/8"]


def test_accelerate_drops_a_tied_alias_with_a_warning_that_our_hook_avoids(tmp_path, caplog):
    """The library behaviour checkpoints.save_tied_once pre-empts: accelerate's safetensors save of a state dict
    with two names for one storage keeps the first and warns."""
    import torch
    from accelerate.utils import save

    from uptrain.checkpoints import save_tied_once

    weight = torch.ones(2, 2)

    def state() -> OrderedDict:
        return OrderedDict(a=weight, b=weight)

    caplog.set_level("WARNING")
    save(state(), tmp_path / "plain.safetensors", safe_serialization=True)
    assert "Removed shared tensor {'b'}" in caplog.text
    caplog.clear()
    weights = [state()]
    save_tied_once([], weights, str(tmp_path))
    save(weights[0], tmp_path / "hooked.safetensors", safe_serialization=True)
    assert "Removed shared tensor" not in caplog.text and list(weights[0]) == ["a"]
