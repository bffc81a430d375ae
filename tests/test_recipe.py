"""Recipes: strict schema, overrides, every shipped recipe, and the errors a user meets before training."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from test_uptrain import setup, write_recipe  # noqa: F401  (the module fixture is shared)

import uptrain.train as train_module
from kvshrink_base.errors import KvshrinkError
from uptrain.__main__ import main
from uptrain.evaluate import main as evaluate_main
from uptrain.recipe import Recipe, RecipeError, load_recipe
from uptrain.train import TrainingError, run

RECIPES = Path(__file__).parents[1] / "recipes"


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "model: m\noutput_dir: out\ndata: {train: [a.txt]}\n"


SHIPPED = [p for p in sorted(RECIPES.rglob("*.yaml")) if "accelerate" not in p.parts]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    """Each shipped recipe loads, says the command that runs it (naming this very file), trains a positive
    budget, distils from the model it converts, and writes its own run directory."""
    assert len(SHIPPED) >= 7
    recipe, text = load_recipe(path), path.read_text()
    assert text.startswith("#"), f"{path} needs a header comment with its command"
    assert f"recipes/{path.name}" in text, f"{path}: its command names another file"
    t = recipe.train
    tokens_per_step = t.micro_batch_size * t.grad_accum * recipe.data.seq_len
    steps = t.max_steps if t.max_steps is not None else t.max_tokens // max(tokens_per_step, 1)
    assert tokens_per_step > 0 and steps >= 1, f"{path}: trains no full step"
    assert t.warmup_steps < steps, f"{path}: warmup longer than the run"
    assert recipe.eval.every_steps >= 1 and recipe.save.keep_last >= 1
    if recipe.convert is not None and recipe.distill.weight > 0:
        assert recipe.teacher == recipe.convert.source, f"{path}: distils from another model than it converts"
    if path.name != "template.yaml":
        others = {load_recipe(p).output_dir for p in SHIPPED if p != path}
        assert recipe.output_dir not in others, f"{path}: output_dir shared with another recipe"


def _defaults(cls) -> dict:
    """A dataclass's defaults as plain data (sections recursively); fields without one are left out."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def test_template_holds_every_key_with_its_default():
    """recipes/template.yaml lists every recipe key with the dataclass default (placeholders aside)."""
    raw = yaml.safe_load((RECIPES / "template.yaml").read_text())
    expected = _defaults(Recipe)
    placeholders = {("model",), ("output_dir",), ("data", "train")}

    def compare(have: dict, want: dict, where: tuple) -> None:
        assert set(have) >= set(want), f"template lacks {sorted(set(want) - set(have))} in {where}"
        for key, value in want.items():
            if (*where, key) in placeholders:
                continue
            if isinstance(value, dict):
                compare(have[key], value, (*where, key))
            else:
                assert have[key] == value, f"template {'.'.join((*where, key))} = {have[key]!r}, default {value!r}"

    compare(raw, expected, ())


def test_accelerate_configs_are_yaml_with_a_command():
    for path in sorted((RECIPES / "accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP") and "accelerate launch" in path.read_text()


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key train\.lr_max; valid keys in train: max_steps, "):
        load_recipe(_write(tmp_path, BASE + "train: {lr_max: 1}\n"))
    with pytest.raises(RecipeError, match=r"unknown recipe key modle; valid keys: output_dir, data, model"):
        load_recipe(_write(tmp_path, BASE + "modle: x\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr: fast}\n", "train.lr: expected float"),
        ("train: {micro_batch_size: 2.5}\n", "train.micro_batch_size: expected int"),
        ("train: {precision: fp8}\n", "train.precision: 'fp8' is not one of auto, bf16, fp16, fp32"),
        ("train: {max_tokens: 1000}\n", "exactly one of train.max_steps or train.max_tokens"),
        ("train: {max_steps: 0}\n", "train.max_steps must be positive, got 0"),
        ("train: {max_steps: null, max_tokens: 0}\n", "train.max_tokens must be positive, got 0"),
        ("train: {betas: [0.9]}\n", r"train.betas must be two numbers \(AdamW's beta1 and beta2\), got \[0.9\]"),
        ("distill: {weight: 0.5}\n", "needs a teacher"),
        ("train: {lr: 1.0e-5, min_lr: 1.0e-4}\n", "is above train.lr"),
    ],
)
def test_bad_values(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, BASE + text))


def test_overrides(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, BASE),
        [
            "train.lr=2e-4",
            "data.seq_len=128",
            "train.max_steps=null",
            "train.max_tokens=5000",
            "teacher=t",
            "distill.weight=0.5",
        ],
    )
    assert recipe.train.lr == 2e-4 and recipe.data.seq_len == 128 and recipe.train.max_tokens == 5000
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe(_write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(RecipeError, match="unknown recipe key train.lrr"):
        load_recipe(_write(tmp_path, BASE), ["train.lrr=1"])


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe") and err.count("\n") == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data={"train": ["/nonexistent/train.txt"]}), "data file /nonexistent/train.txt does not exist"),
        (dict(data={"seq_len": 4096}), "data.seq_len 4096 is beyond the model's 128 positions"),
        (dict(data={"seq_len": 100, "eval": ["EMPTY"]}), "data file .*empty.txt is empty"),
        (dict(data={"seq_len": 100, "eval": ["SHORT"]}), "the eval data gives no block of 100 tokens"),
    ],
)
def test_bad_input_before_training(setup, tmp_path, change, message):
    if change["data"].get("eval") == ["EMPTY"]:
        (tmp_path / "empty.txt").write_text("")
        change["data"]["eval"] = [str(tmp_path / "empty.txt")]
    if change["data"].get("eval") == ["SHORT"]:
        (tmp_path / "short.txt").write_text("A few words only.")
        change["data"]["eval"] = [str(tmp_path / "short.txt")]
    recipe = write_recipe(tmp_path / "r.yaml", setup, tmp_path / "out", **change)
    with pytest.raises(KvshrinkError, match=message):  # a RecipeError, or the text reader's DataError
        run(load_recipe(recipe))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    from textlm import make_lm, train_tokenizer

    other = make_lm(tmp_path / "other", train_tokenizer(setup[0], vocab_size=300))
    recipe = write_recipe(tmp_path / "r.yaml", setup, tmp_path / "out", teacher=str(other), distill={"weight": 0.5})
    with pytest.raises(RecipeError, match="teacher's vocabulary"):
        run(load_recipe(recipe))


@pytest.mark.parametrize("chunk", [0, 512])  # the full-logits path and the chunked one (uptrain.loss)
def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, chunk):
    name = "token_losses" if chunk == 0 else "chunked_loss"
    real = getattr(train_module, name)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return result
        calls["n"] += 1
        if calls["n"] <= 2 * 12:  # from step 13 (2 micro-batches a step)
            return result
        return result * math.nan if chunk == 0 else (result[0] * math.nan, result[1])

    monkeypatch.setattr(train_module, name, poisoned)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        setup,
        tmp_path / "out",
        eval={"every_steps": 100},
        save={"every_steps": 5, "keep_last": 2},
        train={"loss_chunk_tokens": chunk},
    )
    with pytest.raises(
        TrainingError,
        match=r"loss became nan at step 13; stopped before the update; "
        r"the last good checkpoint is .*step-10",
    ):
        run(load_recipe(recipe))
    assert not (tmp_path / "out" / "final").exists()


def test_evaluate_cli(setup, capsys):
    train, held, mha, _ = setup
    assert evaluate_main([str(mha), "--data", str(held), "--seq-len", "64", "--max-tokens", "4096"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert 100 < ppl < 1000  # an untrained model over a 384-token vocabulary
    assert "4,032 tokens" in out  # 64 blocks x 63 predicted tokens
