"""Read text documents from local .txt/.jsonl/.json/.parquet files (globs too) or a `datasets` hub name."""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from alignment.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".jsonl.gz", ".txt.gz")


def expand_paths(patterns: list[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES, key: str = "") -> list[Path]:
    """Expand globs and directories into a sorted list of files with one of `suffixes`; a pattern matching nothing
    is an error (prefixed with the config `key` that named it, when given)."""
    where = f"{key}: " if key else ""
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            raise UserError(f"{where}{pat}: no such file (expected {'/'.join(suffixes)} files, globs or directories)")
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.is_file() and p.name.endswith(suffixes))
            else:
                files.append(m)
    for f in files:
        if not f.name.endswith(suffixes):
            raise UserError(f"{where}{f}: unsupported file type; expected one of {', '.join(suffixes)}")
    return files


def _read_text(path: Path) -> str:
    raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: undecodable bytes at byte {e.start} (line {line}); expected UTF-8 text") from None


def iter_file_documents(path: Path, text_column: str = "text", txt_split: str = "file") -> Iterator[str]:
    """Documents of one file. txt_split for .txt: 'file' (whole file), 'paragraph' (blank lines), 'line', or a
    separator line such as '<|endoftext|>' (TinyStories style)."""
    name = path.name
    if name.endswith((".txt", ".txt.gz")):
        text = _read_text(path)
        if txt_split == "file":
            docs = [text]
        elif txt_split == "paragraph":
            docs = [p for p in text.split("\n\n")]
        elif txt_split == "line":
            docs = text.split("\n")
        else:
            docs = [d.strip("\n") for d in text.split(txt_split)]
        yield from (d for d in docs if d.strip())
    elif name.endswith((".jsonl", ".jsonl.gz")):
        for i, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                raise UserError(f"{path}:{i}: expected an object with a string '{text_column}' field")
            yield row[text_column]
    elif name.endswith(".json"):
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                raise UserError(f"{path}: row {i}: expected an object with a string '{text_column}' field")
            yield row[text_column]
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise UserError(f"{path}: no column '{text_column}' (columns: {', '.join(table.column_names)})")
        for i, v in enumerate(table.column(text_column).to_pylist()):
            if not isinstance(v, str):
                raise UserError(f"{path}: row {i}: '{text_column}' is not a string")
            yield v


def iter_hub_documents(name: str, config: str | None, split: str, text_column: str, streaming: bool = True) -> Iterator[str]:
    """Documents of a `datasets` hub dataset (streamed) or a local dataset directory/script."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # offline, missing, or malformed: one line for the user
        raise UserError(f"dataset {name!r}: could not load split {split!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for i, row in enumerate(ds):
        v = row.get(text_column)
        if not isinstance(v, str):
            raise UserError(f"dataset {name!r} row {i}: expected a string '{text_column}' column")
        yield v


def iter_documents(files: list[str] | None = None, dataset_name: str | None = None, dataset_config: str | None = None,
                   dataset_split: str = "train", text_column: str = "text", txt_split: str = "file") -> Iterator[str]:
    """All documents of the configured sources, files first, then the hub dataset."""
    for path in expand_paths(files or []):
        yield from iter_file_documents(path, text_column, txt_split)
    if dataset_name:
        yield from iter_hub_documents(dataset_name, dataset_config, dataset_split, text_column)
