"""The documents stay true: every command line in README.md and docs/*.md parses with its command's own parser,
README.md stays a landing page, relative links resolve, docs/uptrain.md's recipe reference lists exactly the
recipe's keys, README's headline figures are its demo table's, which is docs/benchmarks.md's and the run's own
results file's, and the sections the recipes and the demo cite exist.

A command is parsed by running its real entry point (``python -m X`` as ``runpy`` runs it, ``kvshrink X`` through
``kvshrink.cli.main``, ``python bench/X.py`` as a script) with ``argparse.ArgumentParser.parse_args`` wrapped: a
successful parse stops the command there (``_Parsed``), a bad flag is argparse's ``SystemExit(2)``. Nothing runs
past the parse, so placeholder paths such as SOURCE and OUTPUT are fine; numbers must be numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import runpy
import shlex
import sys
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}  # fenced blocks whose lines are commands
NOT_OURS = {"pytest", "pip", "venv"}  # python -m modules of other projects
# Every command a user is told about; each must appear in the documents at least once.
COMMANDS = {
    "convert",
    "uptrain",
    "uptrain.evaluate",
    "uptrain.sample",
    "uptrain.merge",
    "kvshrink.decode_bench",
    "kvshrink.demo",
    "kvshrink",
}


class _Parsed(BaseException):
    """Raised by the wrapped ``parse_args`` once a command's own parser accepted its arguments."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line of a document: how it is run (``module``, ``script`` or ``kvshrink``) and its arguments."""

    document: str
    kind: str
    target: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document}: {self.target} {shlex.join(self.args)}"


def shell_lines(text: str) -> list[str]:
    """The lines of the shell-like fenced code blocks, continuation lines (``\\``) joined."""
    lines, block, fence = [], None, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block = stripped, stripped[3:].strip().lower() in SHELL_FENCES
            else:
                fence = None
            continue
        if fence is None or not block:
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + stripped
        else:
            lines.append(stripped)
    return lines


def segments(line: str) -> list[list[str]]:
    """A shell line as its simple commands (split on ``&&``, ``||``, ``;``, ``|``), comments and ``VAR=value``
    prefixes dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current = [], []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            out.append(current)
            current = []
        else:
            current.append(token)
    out.append(current)
    for words in out:
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words.pop(0)
    return [w for w in out if w]


def command_of(words: list[str], document: str) -> Command | None:
    """The command ``words`` run, or None for another program (pip, git, cd, ...)."""
    if words[:2] == ["accelerate", "launch"] and "-m" in words:
        i = words.index("-m")
        return Command(document, "module", words[i + 1], tuple(words[i + 2 :]))
    if words[0] == "kvshrink":
        return Command(document, "kvshrink", "kvshrink", tuple(words[1:]))
    if words[0] in {"python", "python3"} and len(words) > 1:
        if words[1] == "-m":
            if words[2] in NOT_OURS:
                return None
            return Command(document, "module", words[2], tuple(words[3:]))
        if words[1].endswith(".py"):
            return Command(document, "script", words[1], tuple(words[2:]))
    return None


def documented_commands() -> list[Command]:
    found = []
    for path in DOCUMENTS:
        for line in shell_lines(path.read_text()):
            for words in segments(line):
                command = command_of(words, path.relative_to(ROOT).as_posix())
                if command is not None:
                    found.append(command)
    return found


COMMAND_LINES = documented_commands()


def parse(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``command`` until its own parser has read its arguments; a bad argument fails the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        result = original(self, args, namespace)
        if self.prog == "kvshrink":  # the console script's own parser: the subcommand's comes next
            return result
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.chdir(ROOT)
    try:
        if command.kind == "kvshrink":
            from kvshrink.cli import main

            code = main(list(command.args))
        elif command.kind == "script":
            monkeypatch.setattr(sys, "argv", [command.target, *command.args])
            runpy.run_path(str(ROOT / command.target), run_name="__main__")
            code = "no parse"
        else:
            monkeypatch.setattr(sys, "argv", [command.target, *command.args])
            for name in (command.target, command.target + ".__main__"):  # runpy runs a fresh copy; no stale one
                if name in sys.modules and not hasattr(sys.modules[name], "__path__"):
                    monkeypatch.delitem(sys.modules, name)
            runpy.run_module(command.target, run_name="__main__", alter_sys=True)
            code = "no parse"
    except _Parsed:
        return
    except SystemExit as exc:
        code = exc.code
        if code == 0:  # --help
            return
    pytest.fail(f"{command}: its parser refused it (exit {code})")


@pytest.mark.parametrize("command", COMMAND_LINES, ids=str)
def test_documented_command_parses(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    parse(command, monkeypatch)


def test_every_command_is_documented() -> None:
    shown = {c.target for c in COMMAND_LINES}
    assert not COMMANDS - shown, f"commands no document shows: {sorted(COMMANDS - shown)}"


def test_a_renamed_flag_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: a flag the parser does not know fails, as a renamed flag in a document would."""
    bad = Command("test", "module", "convert", ("SOURCE", "OUTPUT", "--kv-heads", "1", "--no-such-flag"))
    with pytest.raises(pytest.fail.Exception, match="refused"):
        parse(bad, monkeypatch)
    bad = Command("test", "kvshrink", "kvshrink", ("uptrain",))  # no recipe
    with pytest.raises(pytest.fail.Exception, match="refused"):
        parse(bad, monkeypatch)


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (move detail to docs/)"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists():
            missing.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            missing.append(target)
    assert not missing, f"{path.name} links to missing files or headings: {missing}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def recipe_keys(cls: type, prefix: str = "") -> set[str]:
    """Every leaf key of a recipe dataclass, dotted (``train.lr``), nested dataclasses followed."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            nested = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
            hint = nested[0] if nested else hint
        if dataclasses.is_dataclass(hint):
            keys |= recipe_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def documented_recipe_keys() -> set[str]:
    """The first-column keys of the tables under docs/uptrain.md's "Recipe reference" section."""
    text = (ROOT / "docs" / "uptrain.md").read_text()
    section = re.search(r"^## Recipe reference$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, 'docs/uptrain.md needs a "## Recipe reference" section'
    return set(re.findall(r"^\| `([a-z_][a-z0-9_.]*)` \|", section.group(1), flags=re.M))


def test_recipe_reference_lists_every_key() -> None:
    from uptrain.recipe import Recipe

    documented, actual = documented_recipe_keys(), recipe_keys(Recipe)
    assert not actual - documented, f"recipe keys missing from docs/uptrain.md: {sorted(actual - documented)}"
    assert not documented - actual, f"docs/uptrain.md documents keys the recipe lacks: {sorted(documented - actual)}"


def markdown_table(text: str, header_start: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of the first Markdown table in ``text`` whose header starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def section(path: Path, heading: str) -> str:
    """The text of a ``## heading`` section."""
    found = re.search(rf"^## {re.escape(heading)}$(.*?)(?=^## |\Z)", path.read_text(), flags=re.M | re.S)
    assert found, f"{path.name} has no section {heading!r}"
    return found.group(1)


DEMO_TABLE = "| model | KV heads | KV-cache bytes/token | ppl, tragedies | ppl, CPython docs |"
ROWS = {  # README's labels of the demo's rows (results.json's, with what the method is)
    "original": "original",
    "MQA, mean (GQA paper)": "MQA, mean",
    "MQA, aware (recommended)": "MQA, aware",
    "MQA, mean, uptrained": "MQA, mean, uptrained",
    "MQA, aware, uptrained": "MQA, aware, uptrained",
}


def demo_table() -> dict[str, list[str]]:
    return markdown_table(section(README, "Results"), DEMO_TABLE)


def figure(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_readme_demo_table_is_the_benchmarks_and_the_runs() -> None:
    """README's demo table is docs/benchmarks.md's, cell for cell, and both are what the run wrote into the
    results file README names (bench/results/...), from an empty cache."""
    readme = demo_table()
    assert list(readme) == list(ROWS)
    assert markdown_table(section(ROOT / "docs" / "benchmarks.md", "The demo"), DEMO_TABLE) == readme
    files = re.search(r"`(bench/results/[^`]+/)`", section(README, "Results"))
    assert files, "README's Results name the demo run's files (bench/results/...)"
    results = json.loads((ROOT / files.group(1) / "demo-results.json").read_text())
    run = {r["model"]: r for r in results["rows"]}
    for label, cells in readme.items():
        r = run[ROWS[label]]
        cloze = f"{r['cloze_acc']:.3f} ± {r['cloze_stderr'] or 0:.3f}" if "cloze_acc" in r else "—"
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:,.1f} s"
        expected = [
            str(r["kv_heads"]),
            f"{r['kv_cache_bytes_per_token']:,}",
            f"{r['eval_ppl']:,.2f}",
            f"{r['off_domain_ppl']:,.2f}",
            cloze,
            f"{r['tokens_trained']:,}",
            seconds,
        ]
        assert cells == expected, f"README's row {label!r} is not the run's: {cells} != {expected}"
    # the run says whether it made the model and the samples itself: README's table is an empty cache's
    assert results["cache"]["model"] == results["cache"]["samples"] == "made", results["cache"]


def test_readme_headline_is_the_demo_table() -> None:
    """The headline's figures are the demo table's: the recommended conversion, mean pooling and the original on
    both texts, and the ratios to the original; so is the limitation's ratio after uptraining."""
    table = demo_table()
    headline = README.read_text().split("## Install")[0].strip().split("\n\n")[-1]
    recommended, mean, original = table["MQA, aware (recommended)"], table["MQA, mean (GQA paper)"], table["original"]
    cited = [recommended[2], recommended[3], original[2], original[3], mean[2], mean[3]]
    ratios = [f"{figure(recommended[i]) / figure(original[i]):.1f}x" for i in (2, 3)]
    for text in cited + ratios:
        assert text in headline, f"README's headline does not cite {text} from its demo table"
    numbers = re.findall(r"\d[\d,]*\.\d+", headline)
    assert sorted(numbers) == sorted(cited + [r[:-1] for r in ratios]), "the headline cites figures not in the table"
    after = figure(table["MQA, aware, uptrained"][3]) / figure(original[3])
    limitation = f"off-domain {after:.1f}x the\n  original's perplexity after uptraining"
    assert limitation in section(README, "Limitations"), f"README's Limitations should say {after:.1f}x"


CITATION = re.compile(r"\((README|docs/[\w.-]+\.md): ([^)]+)\)")


def cited_sections() -> list[tuple[str, str, str]]:
    """(file, document, heading) of each "(docs/X.md: Heading)" or "(README: Heading)" in the recipes, the
    packages (the demo's results cite them too) and the benches."""
    packages = ("kvshrink_base", "convert", "uptrain", "kvshrink", "bench")
    files = sorted((ROOT / "recipes").glob("*.yaml")) + [p for d in packages for p in sorted((ROOT / d).rglob("*.py"))]
    found = []
    for path in files:
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text())  # a citation may wrap, in a comment too
        found += [(path.relative_to(ROOT).as_posix(), doc, heading) for doc, heading in CITATION.findall(text)]
    return found


def test_cited_sections_exist() -> None:
    found = cited_sections()
    assert found, "no citation found: the pattern no longer matches"
    missing = []
    for file, document, heading in found:
        path = README if document == "README" else ROOT / document
        if not path.exists():
            missing.append(f"{file}: ({document}: {heading}): no such document")
            continue
        headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
        if heading.strip().lower() not in {h.strip().lower() for h in headings}:
            missing.append(f"{file}: ({document}: {heading})")
    assert not missing, f"citations of sections that do not exist: {missing}"
