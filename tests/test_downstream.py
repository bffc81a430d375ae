"""Downstream tasks through lm-evaluation-harness: a planted task, the comparison report, the demo's cloze task,
eval.tasks in a recipe and the tensorboard tracker."""

import importlib.util
import json
import math
import random
import re

import pytest
import torch
import yaml
from textlm import make_lm, train_tokenizer, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert import convert_checkpoint
from kvshrink.demo import cloze
from uptrain import downstream
from uptrain.evaluate import main as evaluate_main

pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")

ITEMS = 24


def continuation(model, tokenizer, context: str, text: str) -> tuple[int, float]:
    """(tokens, log p) of `text` after `context`, tokenized as lm-eval's HFLM does: the whole string, split after
    the context's tokens."""
    whole = tokenizer(context + text)["input_ids"]
    n = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return len(whole) - n, sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def planted_items(model_dir, text: str, seed: int = 0) -> list[dict]:
    """4-way items whose label is the choice the model at `model_dir` scores highest (by a margin far above float
    noise): that model must score 100%, an unrelated one ~25%. The choices of an item have the same number of
    tokens, so that no length bias (a near-uniform model prefers fewer tokens) gives the answer away."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    words = re.findall(r"[a-z]{3,}", text)
    rng, items = random.Random(seed), []
    while len(items) < ITEMS:
        start = rng.randrange(len(words) - 8)
        context = " ".join(words[start : start + 6])
        choices = [rng.choice(words)]
        while len(choices) < 4:  # same token count as the first (the tokenizer alone decides: cheap)
            candidate = rng.choice(words)
            if candidate not in choices and n_tokens(tokenizer, context, candidate) == n_tokens(
                tokenizer, context, choices[0]
            ):
                choices.append(candidate)
        scores = [continuation(model, tokenizer, context, " " + c)[1] for c in choices]
        best, second = sorted(scores, reverse=True)[:2]
        if best - second > 0.02:
            items.append({"context": context, "choices": choices, "label": scores.index(best)})
    return items


def n_tokens(tokenizer, context: str, choice: str) -> int:
    return len(tokenizer(context + " " + choice)["input_ids"]) - len(tokenizer(context)["input_ids"])


def task_yaml(directory, name: str, items: list[dict]):
    """A local multiple-choice task: JSONL data and the YAML lm-eval reads it through (dataset_path: json)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(train.txt, eval.txt, original MHA dir, its MQA conversion, an unrelated random model, the planted task)."""
    root = tmp_path_factory.mktemp("downstream")
    train, held = write_corpus(root / "text")
    tokenizer = train_tokenizer(train)
    original = make_lm(root / "original", tokenizer, kv_heads=4, seed=0)
    mqa = root / "mqa"
    convert_checkpoint(original, mqa, kv_heads=1, method="mean")
    other = make_lm(root / "other", tokenizer, kv_heads=4, seed=1)
    task = task_yaml(root / "task", "planted", planted_items(original, held.read_text()))
    return train, held, original, mqa, other, task


def table_rows(text: str) -> dict[str, list[str]]:
    """{model: cells} of the Markdown table printed by the comparison."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {r[0]: r for r in rows[1:]}


def accuracy(cell: str) -> float:
    return float(cell.split("±")[0])


def test_planted_task_scores_the_original_100_percent_and_others_near_chance(models, tmp_path, capsys):
    _, held, original, mqa, other, task = models
    out = tmp_path / "report"
    argv = [
        str(original),
        str(mqa),
        str(other),
        "--tasks",
        str(task),
        "--data",
        str(held),
        "--seq-len",
        "64",
        "--max-tokens",
        "1024",
        "--out",
        str(out),
    ]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    header = next(line for line in printed.splitlines() if line.startswith("| model"))
    assert "planted acc ± stderr" in header and header.rstrip(" |").endswith("perplexity")
    assert list(rows) == [str(original), str(mqa), str(other)]
    assert accuracy(rows[str(original)][6]) == 1.0
    assert accuracy(rows[str(other)][6]) <= 0.6  # 25% expected: 24 items, P(>= 15 right) < 1e-4
    assert float(rows[str(other)][6].split("±")[1]) > 0.05  # a stderr lm-eval computed, not a placeholder
    # method, KV heads, KV-cache bytes per token: 2 layers x (K, V) x kv_heads x head_dim 16 x 4 bytes
    assert rows[str(original)][1:4] == ["—", "4", f"{2 * 2 * 4 * 16 * 4:,} B"]
    assert rows[str(mqa)][1:4] == ["mean", "1", f"{2 * 2 * 1 * 16 * 4:,} B"]
    assert rows[str(mqa)][4] == f"{2 * 2 * 1 * 16 * 4 * 4096 / 2**20:,.1f} MiB"
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(original).parameters())
    assert rows[str(original)][5] == f"{params:,}"
    ppl = [float(rows[m][7].replace(",", "")) for m in rows]
    assert all(math.isfinite(p) and p > 1 for p in ppl)

    report = (out / "report.md").read_text()
    assert "| planted acc ± stderr |" in report and all(f"| {m} |" in report for m in rows)
    assert (out / "report.png").stat().st_size > 10_000
    assert not list(out.glob(".*.tmp*"))


def test_the_api_returns_lm_evals_numbers(models):
    _, _, original, _, _, task = models
    tasks = downstream.load_tasks([str(task)], limit=8)
    assert tasks.names == ["planted"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(original), AutoTokenizer.from_pretrained(original)
    score = downstream.evaluate(model, tokenizer, tasks)["planted"]
    assert (score.metric, score.value, score.samples) == ("acc", 1.0, 8)


def test_bad_inputs_get_one_line_and_exit_2(models, tmp_path, capsys, monkeypatch):
    _, held, original, _, _, task = models
    out = tmp_path / "report"
    cases = [
        ([str(original), "--tasks", "no_such_task_xyz", "--out", str(out)], "unknown task 'no_such_task_xyz'"),
        ([str(original), "--tasks", str(tmp_path / "missing.yaml"), "--out", str(out)], "missing.yaml does not exist"),
        ([str(tmp_path / "no-model"), "--tasks", str(task), "--out", str(out)], "is not a checkpoint directory"),
        ([str(original), "--out", str(out)], "nothing to measure"),
        ([str(original), "--tasks", str(task), "--limit", "0"], "--limit must be positive"),
        ([str(original), "--tasks", str(task), "--decode", "--out", str(out)], "--decode compares models"),
        ([str(original)], "give --data"),
    ]
    bad_data = task_yaml(tmp_path / "bad", "bad", [{"context": "a", "choices": ["b"], "label": 0}])
    bad_data.write_text(bad_data.read_text().replace("bad.jsonl", "gone.jsonl"))
    cases.append(([str(original), "--tasks", str(bad_data)], "task " + str(bad_data) + " cannot be loaded"))
    for argv, message in cases:
        assert evaluate_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert not out.exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert evaluate_main([str(original), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[eval]"' in err


PLAY = """Tragedy of Testing

ACT I

HAMLET
Who goes there, and by what right walks here?
The night is cold and I am sick at heart,
And every star looks down upon the keep.
Say what you will, the ghost will walk tonight,
And we shall see what we have feared to see.

[Enter GHOST]

Nurse
Now by my maidenhead at twelve year old,
I bade her come. What, lamb! What, ladybird!
God forbid! Where's this girl? What, Juliet!
Your lady mother is coming to your chamber.

GHOST
Remember me, remember me, my son,
The serpent that did sting thy father's life
Now wears his crown upon his guilty head,
So art thou to revenge when thou shalt hear.
Sleep rock thy brain, and never come mischance
Between us twain, my lord, my only son.
"""


def test_cloze_items_are_deterministic_and_well_formed():
    documents = {"play-a": PLAY, "play-b": PLAY.replace("ghost", "spirit").replace("GHOST", "SPIRIT")}
    items = cloze.make_items(documents, per_document=50, seed=3)
    assert items == cloze.make_items(documents, per_document=50, seed=3)
    assert items != cloze.make_items(documents, per_document=50, seed=4)
    assert {i["document"] for i in items} == {"play-a", "play-b"}
    for item in items:
        text = documents[item["document"]]
        choices, label = item["choices"], item["label"]
        assert len(choices) == cloze.CHOICES == len(set(choices)) and 0 <= label < cloze.CHOICES
        answer, context = choices[label], item["context"].split("\n")
        assert "\n".join(context[1:] + [answer]) in text  # the true next line of the same speech
        assert cloze.SPEAKER.fullmatch(context[0]) and 2 <= len(context) - 1 <= cloze.CONTEXT_LINES
        speech = next(b for b in text.split("\n\n") if b.startswith(context[0] + "\n") and context[-1] in b)
        for choice in choices[:label] + choices[label + 1 :]:
            assert choice in text and choice not in speech  # from elsewhere in the same play
            assert abs(len(choice) - len(answer)) <= cloze.LENGTH_SLACK * len(answer)
        assert not any(c.startswith("[") for c in choices)
    # Speeches of 5, 4 and 6 lines give 3 + 2 + 4 = 9 lines with 2+ lines before them in each play; each has
    # three distractors of similar length here, so every one becomes an item.
    assert len(items) == 2 * 9


def test_cloze_task_runs_through_lm_eval(models, tmp_path):
    _, _, original, _, _, _ = models
    task = cloze.write_task(cloze.make_items({"play": PLAY}, seed=0), tmp_path / "cloze")
    assert yaml.safe_load(task.read_text())["dataset_kwargs"]["data_files"]["test"] == str(
        (tmp_path / "cloze" / "verse_cloze.jsonl").resolve()
    )
    n = len((tmp_path / "cloze" / "verse_cloze.jsonl").read_text().splitlines())
    tasks = downstream.load_tasks([str(task)])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(original), AutoTokenizer.from_pretrained(original)
    score = downstream.evaluate(model, tokenizer, tasks)["verse_cloze"]
    assert score.metric == "acc" and score.samples == n > 0 and 0 <= score.value <= 1
    with pytest.raises(ValueError, match="no cloze item"):
        cloze.write_task(cloze.make_items({"prose": "one line only\n"}), tmp_path / "empty")


def test_recipe_tasks_run_before_and_after_and_reach_tensorboard(models, tmp_path):
    """eval.tasks in a recipe: scored on the starting and the final model, in metrics.jsonl, the summary and the
    tensorboard events (log.tracker: tensorboard, read back with tensorboard's own EventAccumulator)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uptrain.recipe import load_recipe
    from uptrain.train import run

    train, held, original, mqa, _, task = models
    out = tmp_path / "run"
    recipe = {
        "model": str(mqa),
        "output_dir": str(out),
        "data": {"train": [str(train)], "eval": [str(held)], "seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "warmup_steps": 1},
        "eval": {"every_steps": 2, "max_tokens": 512, "tasks": [str(task)], "tasks_before": True, "tasks_limit": 8},
        "save": {"every_steps": 4},
        "log": {"every_steps": 1, "tracker": "tensorboard"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    summary = run(load_recipe(tmp_path / "r.yaml"))
    key = "downstream/planted/acc"
    assert set(summary.downstream) == set(summary.downstream_before) == {key, key + "_stderr"}
    assert 0 <= summary.downstream[key] <= 1 and "planted/acc" in summary.format()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if key in r]
    assert [(r["step"], r[key]) for r in scored] == [(0, summary.downstream_before[key]), (4, summary.downstream[key])]

    hparams = yaml.safe_load(next(out.rglob("hparams.yml")).read_text())  # the recipe, flat (tracker_config)
    assert hparams["train.lr"] == 1.0e-4 and hparams["eval.tasks"] == json.dumps([str(task)])
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in scalars["loss"]] == [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(scalars["loss"], losses))
    assert [s for s, _ in scalars["eval_ppl"]] == [0, 2, 4]
    assert [(s, round(v, 6)) for s, v in scalars[key]] == [(r["step"], round(r[key], 6)) for r in scored]


def test_decode_adds_the_decode_benchmark_to_the_report(models, tmp_path, capsys):
    _, held, original, mqa, _, _ = models
    out = tmp_path / "report"
    argv = [
        str(original),
        str(mqa),
        "--data",
        str(held),
        "--seq-len",
        "64",
        "--max-tokens",
        "512",
        "--decode",
        "--out",
        str(out),
    ]
    assert evaluate_main(argv) == 0
    report = (out / "report.md").read_text()
    assert "## Decoding (decode_bench)" in report and f"python -m kvshrink.decode_bench {original} {mqa}" in report
    assert (out / "decode" / "results.csv").stat().st_size > 0 and (out / "report.png").stat().st_size > 10_000
    # the tiny models' 128 positions: decode_bench's CPU grid (contexts 256, 1024) is skipped, and says so
    assert "skipped: beyond 128 positions" in report
