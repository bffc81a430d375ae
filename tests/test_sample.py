"""``python -m uptrain.sample``: text sampled from the original model, written whole, usable as training data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from textlm import make_lm, train_tokenizer, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvshrink_base.sample import MIN_TOKENS, Sampling, SamplingError, batch_rows, draw, samples
from uptrain.sample.cli import main


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    train, _ = write_corpus(root / "text")
    return make_lm(root / "lm", train_tokenizer(train), kv_heads=2)


def _documents(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_writes_at_least_the_tokens_asked_for_as_jsonl_documents_reproducibly(lm, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    assert main([str(lm), str(out), "--tokens", "300", "--batch-size", "4", "--length", "40"]) == 0
    reported = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm)
    rows = list(samples(model, tokenizer, Sampling(tokens=300, batch_size=4, length=40)))
    assert _documents(out) == [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    assert all(MIN_TOKENS <= len(r) <= 40 and tokenizer.eos_token_id not in r for r in rows)
    tokens = sum(map(len, rows))
    assert 300 <= tokens < 300 + 4 * 40  # the last batch may overshoot, by less than one batch
    assert f"{len(rows):,} documents, {tokens:,} tokens" in reported

    again = tmp_path / "b.jsonl"
    main([str(lm), str(again), "--tokens", "300", "--batch-size", "4", "--length", "40"])
    assert again.read_bytes() == out.read_bytes()
    assert (
        main(
            [str(lm), str(out), "--tokens", "300", "--batch-size", "4", "--length", "40", "--seed", "1", "--overwrite"]
        )
        == 0
    )
    assert out.read_bytes() != again.read_bytes()  # replaced, by another seed's samples


def test_the_last_batches_draw_only_about_what_is_still_needed():
    how = Sampling(tokens=1000, batch_size=8, length=100)
    assert batch_rows(how, 0, 0) == 8  # nothing known yet: a whole batch
    assert batch_rows(how, 450, 8) == 8  # 56.25 tokens a sample: 550 more need 9.8 samples, + 25%: capped at 8
    assert batch_rows(how, 900, 16) == 3  # 100 more tokens: 1.78 samples, + 25% -> 3
    assert batch_rows(how, 999, 16) == 1
    assert batch_rows(how, 40, 8) == 8  # most samples were dropped as too short: still a whole batch
    few = Sampling(tokens=200, batch_size=64, length=40)
    assert batch_rows(few, 0, 0) == 5  # 200 tokens are 5 full-length samples: not a batch of 64
    assert batch_rows(few, 0, 5) == 5  # all 5 dropped: as many again


def _planted(lm: Path, probabilities: dict[int, float]):
    """The tiny model with zero embeddings (tied with lm_head), so its every next-token distribution is
    softmax(lm_head bias): ``probabilities`` exactly, whatever came before."""
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    bias = torch.full((model.config.vocab_size,), -1e4)
    for token, p in probabilities.items():
        bias[token] = torch.log(torch.tensor(p))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(bias)
    return model


def test_samples_follow_the_model_distribution_at_the_temperature_without_truncation(lm):
    tokenizer = AutoTokenizer.from_pretrained(lm)
    eos = tokenizer.eos_token_id
    a, b = [t for t in range(10) if t != eos][:2]
    model = _planted(lm, {a: 0.8, b: 0.2})
    for temperature, expected in [(1.0, 0.8), (0.5, 0.8**2 / (0.8**2 + 0.2**2))]:  # softmax(log p / T)
        rows = list(samples(model, tokenizer, Sampling(tokens=4000, batch_size=8, length=500, temperature=temperature)))
        drawn = torch.tensor([t for r in rows for t in r])
        assert set(drawn.tolist()) == {a, b}
        assert abs((drawn == a).float().mean().item() - expected) < 0.03  # stderr about 0.006

    # uniform over 100 tokens: no top-k (transformers' default is 50) or top-p cuts the tail, not even where the
    # model's generation_config.json asks for them (generate() fills what it is not given from there)
    uniform = _planted(lm, {t: 0.01 for t in range(101) if t != eos})
    uniform.generation_config.update(
        top_k=5,
        top_p=0.5,
        min_p=0.5,
        typical_p=0.5,
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        epsilon_cutoff=0.5,
        eta_cutoff=0.5,
    )
    rows = list(samples(uniform, tokenizer, Sampling(tokens=2000, batch_size=4, length=500)))
    assert len({t for r in rows for t in r}) == 100


def test_samples_stop_at_eos_and_a_model_that_ends_at_once_is_refused(lm):
    tokenizer = AutoTokenizer.from_pretrained(lm)
    eos = tokenizer.eos_token_id
    other = next(t for t in range(10) if t != eos)
    model = _planted(lm, {other: 0.97, eos: 0.03})  # mean sample length about 32 tokens
    rows = list(samples(model, tokenizer, Sampling(tokens=6000, batch_size=16, length=400)))
    assert all(MIN_TOKENS <= len(r) <= 400 and set(r) == {other} for r in rows)
    # tokens before EOS: geometric, mean 0.97 / 0.03; those kept (at least MIN_TOKENS) average MIN_TOKENS more;
    # about 125 samples, standard deviation about 33: the standard error is about 3
    assert abs(sum(map(len, rows)) / len(rows) - (MIN_TOKENS + 0.97 / 0.03)) < 10

    # no sample reaches MIN_TOKENS: without a limit the loop would never end
    with pytest.raises(SamplingError, match="shorter than"):
        list(samples(_planted(lm, {eos: 1.0}), tokenizer, Sampling(tokens=10, batch_size=2, length=8)))


def test_samples_are_training_data(lm, tmp_path):
    from uptrain.data import build_datasets
    from uptrain.recipe import load_recipe

    out = tmp_path / "s.jsonl"
    main([str(lm), str(out), "--tokens", "600", "--batch-size", "8", "--length", "64"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {lm}\noutput_dir: {tmp_path / 'run'}\ndata: {{train: [{out}], eval: [{out}], seq_len: 32}}\n"
    )
    train, _ = build_datasets(load_recipe(recipe), AutoTokenizer.from_pretrained(lm))
    # documents joined with EOS and cut into 32-token blocks: every sampled token but the last remainder
    tokens = sum(
        len(AutoTokenizer.from_pretrained(lm)(d, add_special_tokens=False)["input_ids"]) + 1 for d in _documents(out)
    )
    assert len(train) == tokens // 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["OUT.txt"], "give a .jsonl file name"),
        (["missing/x.jsonl"], "does not exist"),
        (["x.jsonl", "--tokens", "0"], "must be a positive integer"),
        (["x.jsonl", "--temperature", "0"], "--temperature must be above 0"),
        (["kept.jsonl"], "exists; give --overwrite"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(lm, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept.jsonl").write_text("the user's")
    argv = [str(lm), *args] + ([] if "--tokens" in args else ["--tokens", "10"])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["kept.jsonl"]
    assert (tmp_path / "kept.jsonl").read_text() == "the user's"


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x.jsonl"), "--tokens", "10"]) == 2
    assert "nothing: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_samples_that_end_leave_the_batch_and_the_cache_without_changing_the_others(lm, monkeypatch):
    """A model whose samples end at different steps (EOS made likely, its odds depending on the context): the
    ended samples pruned out of the batch and the KV cache give exactly the samples drawn with them kept."""
    from transformers import DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(lm)
    eos = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 2.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    how = Sampling(tokens=1, batch_size=8, length=60)
    pruned = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, i: pruned.append(len(i)) or select(self, i))

    def eight():
        torch.manual_seed(0)
        with torch.inference_mode():
            return draw(model, tokenizer.bos_token_id, 8, how, eos)

    with_pruning = eight()
    lengths = [len(d) for d in with_pruning]
    assert len(set(lengths)) >= 4 and min(lengths) < 60 and max(lengths) == 60, lengths  # ends at different steps
    assert all(d[-1] == eos for d in with_pruning if len(d) < 60) and pruned and pruned[-1] < 8
    for cls in DynamicCache.__mro__:  # a cache that cannot drop rows: every sample stays in the batch
        if "batch_select_indices" in vars(cls):
            monkeypatch.delattr(cls, "batch_select_indices")
    assert eight() == with_pruning


def test_the_sampler_loads_nothing_of_the_converter_or_the_uptrainer():
    """The sampler is in the base (the converter calibrates on its text): importing it loads no command."""
    code = (
        "import sys, kvshrink_base.sample; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('convert', 'uptrain', 'kvshrink')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
