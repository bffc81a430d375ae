"""One model, three perplexities: every place that shows an eval perplexity says its setting (tokens scored,
block length), so that the demo's table, the training plot and ``python -m uptrain.evaluate`` can be compared."""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from textlm import make_lm, train_tokenizer, write_corpus
from uptrain import evaluate as evaluate_cli
from uptrain.plot import eval_title, plot_metrics
from uptrain.train import evaluate


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    train, held = write_corpus(root / "text")
    return make_lm(root / "model", train_tokenizer(train), kv_heads=2), held


def test_in_loop_eval_records_its_setting(lm):
    model = AutoModelForCausalLM.from_pretrained(lm[0])
    blocks = [{"input_ids": torch.randint(0, 300, (48,))} for _ in range(5)]
    loader = torch.utils.data.DataLoader(blocks, batch_size=2)
    result = evaluate(model, loader, Accelerator(cpu=True))
    assert result["eval_tokens"] == 5 * 47 and result["eval_seq_len"] == 48  # 47 predicted tokens per block


def test_plot_title_says_the_eval_setting(tmp_path):
    records = [{"step": 0, "tokens": 0, "eval_ppl": 90.0, "eval_tokens": 4080, "eval_seq_len": 256},
               {"step": 1, "tokens": 1024, "loss": 4.1}]
    assert eval_title(records) == "eval perplexity\n(4,080 tokens scored in blocks of 256)"
    assert eval_title([{"step": 0, "tokens": 0, "eval_ppl": 90.0}]) == "eval perplexity"  # an older run's metrics
    plot_metrics(records, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_line_says_tokens_and_block_length(lm, capsys):
    model, held = lm
    assert evaluate_cli.main([str(model), "--data", str(held), "--seq-len", "32", "--max-tokens", "320"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("on 310 tokens in blocks of 32"), line  # 10 blocks x 31 predicted tokens
