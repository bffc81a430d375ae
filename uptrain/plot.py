"""The training plot: train loss and eval perplexity against tokens trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(records: list[dict[str, Any]], path: Path, seq_len: int | None = None) -> None:
    """Write the two panels (train loss, eval perplexity, against tokens trained) of metrics.jsonl's records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["tokens"], r["eval_ppl"]) for r in records if "eval_ppl" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        left.plot(*zip(*train), color="tab:blue")
    left.set(xlabel="tokens trained", ylabel="train loss", title="train loss")
    if evals:
        right.plot(*zip(*evals), marker="o", color="tab:orange")
        right.set_yscale("log")
    right.set(xlabel="tokens trained", ylabel="eval perplexity", title=eval_title(records, seq_len))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_title(records: list[dict[str, Any]], seq_len: int | None) -> str:
    """The eval panel's title with the evals' setting: tokens scored (as recorded) and block length."""
    last = next((r for r in reversed(records) if "eval_tokens" in r), None)
    if last is None or seq_len is None:
        return "eval perplexity"
    return f"eval perplexity\n({last['eval_tokens']:,} tokens scored in blocks of {seq_len})"
