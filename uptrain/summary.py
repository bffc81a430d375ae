"""What one uptraining run returns: ``uptrain.train.run``'s result, printed by the CLI, kept by the demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainingSummary:
    """One run's figures.

    ``eval_ppl_before`` is the first in-loop eval (step 0, or the log's first when resumed); ``tokens`` counts the
    run's steps from the start, ``seconds`` and ``tokens_per_s`` this process's part only (a resumed run times what
    it trained). ``final`` and ``plot`` are set on the main process once they are written; ``downstream_before`` and
    ``downstream`` hold the recipe's ``eval.tasks`` scores (empty without tasks).
    """

    eval_ppl_before: float
    eval_ppl_after: float
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final: str | None = None
    plot: str | None = None
    downstream_before: dict[str, float] = field(default_factory=dict)
    downstream: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The figures as a plain dict (JSON-ready)."""
        return asdict(self)

    def format(self) -> str:
        """The CLI's table: one ``name  value`` row per figure; downstream scores without their stderr."""
        rows = [
            ("eval perplexity before", f"{self.eval_ppl_before:.2f}"),
            ("eval perplexity after", f"{self.eval_ppl_after:.2f}"),
            ("steps", f"{self.steps:,}"),
            ("tokens trained", f"{self.tokens:,}"),
            ("time (this run)", f"{self.seconds:.1f} s"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
            ("final checkpoint", self.final or ""),
            ("plot", self.plot or ""),
        ]
        for scores, suffix in ((self.downstream_before, " (before)"), (self.downstream, "")):
            rows += [
                (f"{k.removeprefix('downstream/')}{suffix}", f"{v:.4f}")
                for k, v in scores.items()
                if not k.endswith("_stderr")
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
