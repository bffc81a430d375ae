"""What a run logs: ``metrics.jsonl`` (one JSON object per logged step) and the recipe as a tracker's
hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            kept = [line for line in self.read() if line["step"] <= resume_step] if resume_step else []
            path.write_text("".join(json.dumps(x) + "\n" for x in kept))

    def read(self) -> list[dict[str, Any]]:
        """Every record written so far, in order."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (on the main process; the others keep no log)."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def tracker_config(values: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The recipe as a tracker's hyperparameters: dotted keys and scalar values, lists and None as JSON text
    (tensorboard's ``add_hparams`` refuses anything else)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(tracker_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat
