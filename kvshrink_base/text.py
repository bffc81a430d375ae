"""The one text reader: calibration (``convert``) and training and evaluation (``uptrain``) read the same files.

An entry is a file, a glob, a directory (its files of a known type) or a ``datasets`` hub name. Files go through
``datasets``' builders: .txt/.md (one document per paragraph), .jsonl/.json, .parquet, .csv (a text column).
"""

from __future__ import annotations

import codecs
import glob
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from kvshrink_base.errors import KvshrinkError, first_line

if TYPE_CHECKING:
    import datasets

    # A datasets table: in memory, or streamed (``streaming=True``).
    HFDataset: TypeAlias = datasets.Dataset | datasets.IterableDataset


class DataError(KvshrinkError):
    """Text that cannot be read: printed on one line, exit code 2."""


BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def local_files(entry: str) -> list[str] | None:
    """The files an entry names (a glob, a file or a directory), or None when it is no local path.

    Raises:
        DataError: a pattern that matches nothing, a missing path, or a directory without data files.
    """
    if any(c in entry for c in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(entry), recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data file pattern {entry} matches no files")
        return files
    path = Path(entry).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
        if not files:
            raise DataError(
                f"data {entry} is a directory with no data files in it ({', '.join(BUILDERS)}); "
                "give a text file, or a directory that holds some"
            )
        return files
    if path.is_file():
        return [str(path)]
    if path.suffix in BUILDERS or entry.startswith((".", "/", "~")):
        raise DataError(f"data file {entry} does not exist")
    return None  # a datasets hub name


BINARY = (".parquet",)  # the builders' binary formats: every other one reads UTF-8 text
PROBE = 1 << 20  # bytes of each text file checked for UTF-8 before datasets reads it


def check_file(path: str) -> None:
    """Refuse a data file that cannot be read, is empty, or (for a text format) is not UTF-8 text, in one line,
    before ``datasets`` meets it (its errors are tracebacks or arrive mid-stream).

    Raises:
        DataError: the file is unreadable, empty or binary.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(PROBE)
    except IsADirectoryError:
        raise DataError(f"data file {path} is a directory; give a file (or the directory itself as an entry)") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if not head:
        raise DataError(f"data file {path} is empty: it holds no text")
    if Path(path).suffix in BINARY:
        return
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < PROBE)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text (byte {exc.start} is {head[exc.start]:#04x}); give a text file"
        ) from None


def check_entries(entries: list[str]) -> None:
    """Check every local file of ``entries`` (``local_files``, ``check_file``) before a command loads anything;
    hub names are left to ``load_documents``.

    Raises:
        DataError: a missing, empty, unreadable or binary file, or a directory without data files.
    """
    for entry in entries:
        for f in local_files(entry) or []:
            check_file(f)


def read_text_file(path: str | Path) -> str:
    """One whole UTF-8 text file, refused in one line when missing, a directory, unreadable, binary or empty.

    Raises:
        DataError: as ``check_file``, or a missing file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; give a text file")
    check_file(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 text (byte {exc.start}); give a text file") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise DataError(f"data file {path} holds no text (only whitespace)")
    return text


def load_documents(
    entries: list[str],
    text_field: str,
    streaming: bool = False,
    hub_config: str | None = None,
    hub_split: str = "train",
) -> HFDataset:
    """One dataset with a single ``text_field`` column, from local files and/or hub dataset names."""
    import datasets

    parts = []
    for entry in entries:
        files = local_files(entry)
        if files is None:
            try:
                parts.append(datasets.load_dataset(entry, hub_config, split=hub_split, streaming=streaming))
            except Exception as exc:
                raise DataError(
                    f"data {entry!r} is not a local file and could not be loaded from the hub ({first_line(exc)})"
                ) from None
            continue
        for suffix, grouped in itertools.groupby(sorted(files, key=lambda f: Path(f).suffix), lambda f: Path(f).suffix):
            group = list(grouped)
            if suffix not in BUILDERS:
                raise DataError(f"data file {group[0]} has an unsupported type; use {', '.join(BUILDERS)}")
            builder = BUILDERS[suffix]
            for f in group:
                check_file(f)
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                part = datasets.load_dataset(builder, data_files=group, split="train", streaming=streaming, **kwargs)
            except Exception as exc:  # a malformed json/csv/parquet file
                cause = exc.__cause__ or exc
                reason = first_line(cause)
                raise DataError(f"cannot read data file(s) {', '.join(group)}: {reason}") from None
            if builder == "text" and text_field != "text":
                part = part.rename_column("text", text_field)
            parts.append(part)
    for part, entry in zip(parts, entries):
        columns = part.column_names
        if columns is None:  # datasets 5 streams do not know their columns before the first row
            columns = list(next(iter(part), {}))
        if text_field not in columns:
            raise DataError(
                f"data {entry} has no column {text_field!r} (columns: {', '.join(columns)}); set data.text_field"
            )
    parts = [p.select_columns([text_field]) for p in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_documents(entries: list[str], text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """The documents of ``entries`` as strings, streamed, until ``max_chars`` characters (calibration's reader).

    Raises:
        DataError: unreadable, missing or empty text.
    """
    documents, chars = [], 0
    rows = iter(load_documents(entries, text_field, streaming=True))
    while max_chars is None or chars < max_chars:
        try:
            row = next(rows, None)
        except UnicodeDecodeError as exc:  # past the bytes check_file probed
            raise DataError(
                f"{', '.join(entries)}: not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk); give text files"
            ) from None
        if row is None:
            break
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            documents.append(text)
            chars += len(text)
    if not documents:
        raise DataError(f"{', '.join(entries)} holds no text")
    return documents
