"""Reading a source checkpoint lazily: its config.json and one tensor at a time.

Safetensors headers are parsed and checked before anything is written; tensor
bytes are then read with ``pread`` or copied file-to-file with
``copy_file_range``, so memory never holds more than the tensor being changed.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from convert.errors import ConversionError
from kvshrink_base.errors import first_line

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (bytes per element, torch name). Planning works on these names alone, so a
# conversion can start copying before torch has finished importing.
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def torch_dtype(name: str) -> torch.dtype:
    """safetensors name -> torch dtype."""
    import torch

    return getattr(torch, DTYPES[name][1])


def write_tensor_bytes(tensor: torch.Tensor, out: BinaryIO) -> None:
    """A CPU tensor's raw little-endian bytes."""
    import torch

    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors name."""
    label = str(dtype).removeprefix("torch.")
    return next(name for name, (_, torch_name) in DTYPES.items() if torch_name == label)


_MAX_HEADER = 100_000_000
_CHUNK = 64 << 20
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def resolve_source(source: str, allow_pickle: bool = False) -> Path:
    """A local checkpoint directory, or a hub id fetched with huggingface_hub when the network allows."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"SOURCE {source} is a file; give the checkpoint's directory")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConversionError(f"SOURCE {source} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        patterns += ["pytorch_model*.bin"] if allow_pickle else []
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way
        reason = first_line(exc)
        raise ConversionError(
            f"SOURCE {source} is not a local directory and could not be fetched from the hub ({reason}); "
            "download it first or pass a local path"
        ) from None


def hub_id(source: str, directory: Path) -> str | None:
    """The hub id a checkpoint came from: ``source`` itself when it was fetched, or the repository a hub-cache
    snapshot directory names (``.../models--owner--name/snapshots/REV``); None for any other local path."""
    if not Path(source).expanduser().exists():
        return source
    parts = directory.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def check_checkpoint(path: str, *, hub: bool = True, allow_pickle: bool = False) -> Path | None:
    """Check a local checkpoint before another library loads it (uptrain, evaluate, decode_bench): convert's checks.

    Args:
        hub: a missing ``org/name`` path may be a hub id (the caller's loader resolves it); False: always an error.
        allow_pickle: also open ``pytorch_model*.bin`` weights (else only safetensors are checked).

    Returns:
        The directory, or None when ``path`` names nothing local and may be a hub id (``org/name``).

    Raises:
        ConversionError: no such directory, a file, no config.json, or missing, truncated or corrupt weights.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        if not hub or path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise ConversionError(f"{path}: no such directory")
        return None
    if not directory.is_dir():
        raise ConversionError(f"{path} is a file; give the checkpoint's directory")
    if not (directory / "config.json").is_file():
        raise ConversionError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    read_config(directory)
    if allow_pickle or not any(directory.glob("pytorch_model*.bin")) or any(directory.glob("*.safetensors*")):
        open_weights(directory, allow_pickle)  # headers only: a truncated or corrupt file is named before any load
    return directory


def read_config(directory: Path) -> dict:
    """config.json as plain JSON (never through a transformers config class)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{directory} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return config


@dataclass
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range in that file."""

    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; byte ranges must tile the data section exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path} is truncated or not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{path} is truncated or corrupt (header of {header_len} bytes)")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConversionError(f"{path} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    try:
        for name, entry in header.items():
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != math.prod(shape) * DTYPES[dtype][0]:
                raise ValueError(name)
            tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: t.start):
        if info.start != position:
            raise ConversionError(f"{path} is corrupt: tensor byte ranges overlap or leave gaps")
        position = info.end
    if position != size:
        kind = "truncated" if position > size else "corrupt (trailing bytes)"
        raise ConversionError(f"{path} is {kind}: header describes {position} bytes, file has {size}")
    return tensors


def _shard_path(directory: Path, name: object, index_path: Path) -> Path:
    """An index entry's file, which must be a plain name inside the checkpoint directory."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ConversionError(f"{index_path} names a file outside the checkpoint: {name!r}")
    path = directory / name
    if not path.is_file():
        raise ConversionError(f"{index_path} names shard {name}, which is missing")
    return path


class WeightSource:
    """All tensors of a checkpoint, read lazily one at a time."""

    def __init__(self, tensors: dict[str, TensorInfo], files: list[Path], pickled: dict[str, torch.Tensor] | None):
        self.tensors = tensors
        self.files = files
        self._pickled = pickled

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in memory that this process owns."""
        import torch

        if self._pickled is not None:
            return self._pickled[name].clone()
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as fh:
            view, done = memoryview(buffer), 0
            while done < info.nbytes:
                got = os.preadv(fh.fileno(), [view[done:]], info.start + done)
                if got <= 0:
                    raise ConversionError(f"{info.file} is truncated")
                done += got
        dtype = torch_dtype(info.dtype)
        if not buffer:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)

    def copy_raw(self, name: str, out: BinaryIO) -> None:
        """Copy one tensor's bytes unchanged into ``out`` (kernel-side where the OS allows)."""
        if self._pickled is not None:
            write_tensor_bytes(self._pickled[name], out)
            return
        info = self.tensors[name]
        out.flush()
        end = out.tell() + info.nbytes
        with open(info.file, "rb") as fh:
            offset, left = info.start, info.nbytes
            while left:
                size, position = min(left, _CHUNK), end - left
                try:
                    sent = os.copy_file_range(fh.fileno(), out.fileno(), size, offset, position)
                except OSError:  # unsupported here (old kernel, odd filesystem): plain reads
                    sent = 0
                if sent == 0:
                    data = os.pread(fh.fileno(), size, offset)
                    if not data:
                        raise ConversionError(f"{info.file} is truncated")
                    sent = os.pwrite(out.fileno(), data, position)
                offset += sent
                left -= sent
        out.seek(end)  # the writes above went past the buffered writer


def _index_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConversionError(f"{index_path} is not a valid index (needs a weight_map object)") from None
    return weight_map


def _check_against_index(weight_map: dict[str, str], found: dict[str, str], index_path: Path) -> None:
    missing = sorted(set(weight_map) - set(found))
    if missing:
        raise ConversionError(f"{index_path} lists {len(missing)} tensor(s) not in their shard, e.g. {missing[0]}")
    extra = sorted(set(found) - set(weight_map))
    if extra:
        raise ConversionError(
            f"shard {found[extra[0]]} holds {len(extra)} tensor(s) missing from {index_path.name}, e.g. {extra[0]}"
        )
    moved = sorted(n for n in weight_map if weight_map[n] != found[n])
    if moved:
        raise ConversionError(f"{index_path} puts {moved[0]} in {weight_map[moved[0]]}, but it is in {found[moved[0]]}")


def open_weights(directory: Path, allow_pickle: bool = False) -> WeightSource:
    """Find, check and open the checkpoint's weights (safetensors; pickle only when allowed).

    Raises:
        ConversionError: no weights, a bad index, a missing, truncated or corrupt shard,
            or pickle weights without ``allow_pickle``.
    """
    if (directory / "model.safetensors.index.json").is_file() or (directory / "model.safetensors").is_file():
        return _open_safetensors(directory)
    if (directory / "pytorch_model.bin.index.json").is_file() or (directory / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise ConversionError(
                f"{directory} has only pickle weights (pytorch_model*.bin), which can run code when loaded; "
                "pass --allow-pickle if you trust them"
            )
        return _open_pickle(directory)
    others = sorted(p.name for p in directory.iterdir() if re.search(r"\.(gguf|pt|pth|ckpt|h5|msgpack)$", p.name))
    hint = f" (found {', '.join(others)}, which this tool does not read)" if others else ""
    raise ConversionError(f"{directory} has no model.safetensors, safetensors index or pytorch_model.bin{hint}")


def _open_safetensors(directory: Path) -> WeightSource:
    """model.safetensors, or the shards its index names (and any shard on disk the index forgot): headers only."""
    st_index = directory / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    files = [directory / "model.safetensors"]
    if st_index.is_file():
        weight_map = _index_map(st_index)
        indexed = {_shard_path(directory, f, st_index) for f in weight_map.values()}
        # A shard on disk that the index forgot would otherwise drop its tensors silently.
        files = sorted(indexed | {p for p in directory.glob("model-*-of-*.safetensors") if _SHARD.fullmatch(p.name)})
    tensors: dict[str, TensorInfo] = {}
    found: dict[str, str] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise ConversionError(f"tensor {name} is in both {tensors[name].file.name} and {file.name}")
            tensors[name], found[name] = info, file.name
    if weight_map is not None:
        _check_against_index(weight_map, found, st_index)
    if not tensors:
        raise ConversionError(f"{directory} has weight files but no tensors in them")
    return WeightSource(tensors, files, None)


def _open_pickle(directory: Path) -> WeightSource:
    """pytorch_model.bin or its shards, loaded with ``weights_only=True`` and memory-mapped."""
    import torch

    bin_index = directory / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        weight_map = _index_map(bin_index)
        files = sorted({_shard_path(directory, f, bin_index) for f in weight_map.values()})
    else:
        weight_map, files = None, [directory / "pytorch_model.bin"]
    pickled: dict[str, torch.Tensor] = {}
    tensors: dict[str, TensorInfo] = {}
    found: dict[str, str] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ConversionError(f"cannot load {file}: {first_line(exc)}") from None
        for name, tensor in state.items():
            pickled[name], found[name] = tensor, file.name
            tensors[name] = TensorInfo(
                file, dtype_name(tensor.dtype), tuple(tensor.shape), 0, tensor.numel() * tensor.element_size()
            )
    if weight_map is not None:
        _check_against_index(weight_map, found, bin_index)
    return WeightSource(tensors, files, pickled)
