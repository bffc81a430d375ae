"""Writing the output checkpoint: streamed safetensors shards inside an atomic directory.

Every output tensor's dtype and shape are known before the first byte is
written, so each shard's header is written first and the tensors follow one at
a time; nothing holds a whole shard in memory. Tensors copied unchanged are
written first, computed ones after (at their planned offsets), so copying runs
while torch is still importing.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from convert.errors import ConversionError
from convert.source import DTYPES

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise ConversionError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ConversionError(f"--max-shard-size must be positive, got {text!r}")
    return size


@dataclass
class OutTensor:
    """One tensor of the output: its name, dtype, shape, and how to produce its bytes."""

    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]
    computed: bool = False  # needs torch (pooled, cast or transposed), as opposed to a byte copy

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]


def shard_plan(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Cut tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard(path: Path, tensors: list[OutTensor], progress: Callable[[int], object] = lambda n: None) -> None:
    """Write one safetensors file: the header, then each tensor's bytes as its producer makes them.

    Tensors are laid out largest item size first, so each starts aligned to its element size;
    byte copies are written before computed tensors, each at its planned offset.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t.dtype][0], t.name))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, offset = {}, 0
    for tensor in ordered:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offsets[tensor.name] = offset
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for tensor in sorted(ordered, key=lambda t: t.computed):
            out.seek(start + offsets[tensor.name])
            tensor.write(out)
            if out.tell() != start + offsets[tensor.name] + tensor.nbytes:
                raise RuntimeError(
                    f"internal error: {tensor.name} wrote {out.tell() - start - offsets[tensor.name]} "
                    f"bytes, expected {tensor.nbytes}"
                )
            progress(tensor.nbytes)


def write_index(directory: Path, shards: list[list[OutTensor]], names: list[str]) -> None:
    weight_map = {t.name: file for shard, file in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse an OUTPUT that would lose the user's data or the source."""
    out, src = output.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ConversionError(f"OUTPUT {output} overlaps SOURCE {source}; choose a separate directory")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"OUTPUT {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"OUTPUT {output} exists and is not empty; pass --overwrite to replace it")
    if not output.parent.exists():
        raise ConversionError(f"the parent directory of OUTPUT {output} does not exist")
