"""The demo's offline downstream task: choose the true next line of verse among four (a cloze).

Built from text the model is never trained on (the held-out tragedies, one document per play). An item is
the speaker and up to ``CONTEXT_LINES`` lines of one speech, then four candidate next lines: the true one and
three drawn from elsewhere in the same play, each within ``LENGTH_SLACK`` of the true line's length, so that
neither length nor the play's vocabulary gives the answer away; only what the lines say and how verse runs
on does. Chance is 25%.

Written as JSONL plus an lm-eval task YAML (the template ``verse_cloze.yaml``, shipped with this package,
with the data file's absolute path filled in), for ``python -m uptrain.evaluate MODEL --tasks
DIR/verse_cloze.yaml``. The same documents and seed give the same items, byte for byte::

    python -m kvshrink.demo.cloze                      # the tragedies -> ~/.cache/kvshrink/verse_cloze
    python -m kvshrink.demo.cloze --text my.txt --out DIR    # any held-out text, one document per file
"""

from __future__ import annotations

import importlib.resources
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvshrink import assets
from kvshrink_base.errors import KvshrinkError, OneLineParser, run_cli
from kvshrink_base.text import read_text_file

TEMPLATE = "verse_cloze.yaml"
CHOICES = 4
CONTEXT_LINES = 4  # at most, before the line to guess
MIN_CONTEXT = 2  # at least
LINE_CHARS = (20, 80)  # lines eligible as answers and distractors: verse, not prose paragraphs or headings
LENGTH_SLACK = 0.3  # distractors' length within 30% of the answer's
PER_DOCUMENT = 50
VERSE_START = re.compile(r"[^A-Za-z]*[A-Z]")  # "'Tis now struck twelve"
SPEAKER = re.compile(r"[A-Za-z][A-Za-z' &-]{0,29}")  # a speech's first line: "KING LEAR", "Nurse"


@dataclass(frozen=True)
class Run:
    """Consecutive lines of one speech (or paragraph), unbroken by a stage direction."""

    speaker: str | None
    lines: tuple[str, ...]


def runs(text: str) -> list[Run]:
    """The runs of a document's plain text (``kvshrink.assets.plain_text``): blank-line separated blocks,
    a block's short first line taken as its speaker, split at bracketed stage directions."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        speaker = lines[0] if len(lines) >= 2 and SPEAKER.fullmatch(lines[0]) else None
        current: list[str] = []
        for line in lines[speaker is not None :] + ["["]:
            if line.startswith("["):
                if current:
                    out.append(Run(speaker, tuple(current)))
                current = []
            else:
                current.append(line)
    return out


def eligible(line: str) -> bool:
    """A line of verse: 20 to 80 characters, capitalized (wrapped prose goes on in lower case)."""
    return LINE_CHARS[0] <= len(line) <= LINE_CHARS[1] and VERSE_START.match(line) is not None


def document_items(text: str, rng: random.Random, per_document: int) -> list[dict[str, Any]]:
    """Up to `per_document` items from one document, in document order."""
    all_runs = runs(text)
    pool = sorted({(line, i) for i, r in enumerate(all_runs) for line in r.lines if eligible(line)})
    targets = [(i, j) for i, r in enumerate(all_runs) for j in range(MIN_CONTEXT, len(r.lines)) if eligible(r.lines[j])]
    items = []
    for i, j in sorted(rng.sample(targets, min(per_document, len(targets)))):
        run, answer = all_runs[i], all_runs[i].lines[j]
        near = sorted(
            {
                line
                for line, k in pool
                if k != i and line != answer and abs(len(line) - len(answer)) <= LENGTH_SLACK * len(answer)
            }
        )
        if len(near) < CHOICES - 1:
            continue
        choices = rng.sample(near, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, answer)
        context = ([run.speaker] if run.speaker else []) + list(run.lines[max(0, j - CONTEXT_LINES) : j])
        items.append({"context": "\n".join(context), "choices": choices, "label": label})
    return items


def make_items(documents: dict[str, str], per_document: int = PER_DOCUMENT, seed: int = 0) -> list[dict[str, Any]]:
    """Items from every document (in name order), each tagged with its document's name."""
    rng = random.Random(seed)
    items = []
    for name in sorted(documents):
        items += [dict(item, document=name) for item in document_items(documents[name], rng, per_document)]
    return items


def task_files(items: list[dict[str, Any]], out: Path) -> dict[Path, str]:
    """{OUT/verse_cloze.jsonl: the items, OUT/verse_cloze.yaml: the shipped template pointing at them}."""
    if not items:
        raise ValueError("the text gives no cloze item: it needs runs of 3 or more lines of 20 to 80 characters")
    data, task = out / "verse_cloze.jsonl", out / "verse_cloze.yaml"
    template = (importlib.resources.files("kvshrink.demo") / TEMPLATE).read_text()
    placeholder = f"test: {data.name}\n"
    assert template.count(placeholder) == 1, f"{TEMPLATE} lost its data_files placeholder"
    header = f"# Written by kvshrink.demo.cloze from {TEMPLATE}: {len(items)} items in {data.name}.\n"
    config = header + template.replace(placeholder, f"test: {json.dumps(str(data.resolve()))}\n")
    return {data: "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), task: config}


def write_task(items: list[dict[str, Any]], out: Path) -> Path:
    """OUT/verse_cloze.jsonl and OUT/verse_cloze.yaml (``task_files``), each written only where it holds anything
    else; returns the YAML."""
    for path, text in task_files(items, out).items():
        assets.write_if_changed(path, text)
    return out / "verse_cloze.yaml"


def tragedies_task() -> Path:
    """The demo's task from the held-out tragedies (defaults), in the cache: made again on every call (a fraction
    of a second), so the files are always this code's items of these plays."""
    return write_task(make_items(assets.plays(assets.EVAL_PLAYS)), assets.cache_dir() / "verse_cloze")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m kvshrink.demo.cloze", description=__doc__.splitlines()[0])
    p.add_argument("--text", nargs="+", help="plain-text files, one document each (default: the tragedies)")
    p.add_argument("--out", type=Path, help="output directory (default: the cache's verse_cloze)")
    p.add_argument("--per-document", type=int, default=PER_DOCUMENT, help=f"items per document ({PER_DOCUMENT})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        if args.per_document < 1:
            raise KvshrinkError(f"--per-document must be positive, got {args.per_document}")
        if args.text:
            documents = {Path(f).name: read_text_file(f) for f in args.text}
        else:
            documents = assets.plays(assets.EVAL_PLAYS)
        try:
            items = make_items(documents, args.per_document, args.seed)
        except ValueError as exc:
            raise KvshrinkError(str(exc)) from None
        task = write_task(items, args.out or assets.cache_dir() / "verse_cloze")
        print(f"{task}\nrun it: python -m uptrain.evaluate MODEL --tasks {task}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
