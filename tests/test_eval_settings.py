"""One model, three perplexities: the places that show an eval perplexity say their setting (tokens scored,
block length), so that the demo's table and the training plot can be compared (the demo's table: test_demo;
``python -m uptrain.evaluate``'s line: its own tests)."""

import torch
from accelerate import Accelerator
from tiny import make_model

from uptrain.perplexity import eval_metrics
from uptrain.plot import eval_title, plot_metrics


def test_in_loop_eval_records_the_tokens_it_scored():
    blocks = [{"input_ids": torch.randint(0, 64, (48,))} for _ in range(5)]
    loader = torch.utils.data.DataLoader(blocks, batch_size=2)
    result = eval_metrics(make_model("llama", 2), loader, Accelerator(cpu=True))
    assert result["eval_tokens"] == 5 * 47  # 47 predicted tokens per block of 48


def test_plot_title_says_the_eval_setting(tmp_path):
    records = [
        {"step": 0, "tokens": 0, "eval_ppl": 90.0, "eval_tokens": 4080},
        {"step": 1, "tokens": 1024, "loss": 4.1},
    ]
    assert eval_title(records, 256) == "eval perplexity\n(4,080 tokens scored in blocks of 256)"
    assert eval_title([{"step": 0, "tokens": 0, "eval_ppl": 90.0}], 256) == "eval perplexity"  # older metrics
    plot_metrics(records, tmp_path / "training.png", 256)
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
