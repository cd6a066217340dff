"""Readers: input files (jsonl / json / parquet, local or any pyarrow filesystem URI) -> records
with their place in the input.

Reading is lazy (a file is opened when its first record is wanted, parquet read by row group),
and a record that cannot be read is still a record: `Located.error` holds why, so the stage
that reads it can reject it with its location rather than lose it. Ingest and the public
preference sources read their input through these.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class Located:
    """A record read from input, with where it came from; `error` set when unreadable.

    `file` and `row` order records as the input does (what "first" means for duplicate ids).
    """

    record: object
    location: str
    raw: str = ""
    error: tuple[str, str] | None = None
    file: str = ""
    row: int = 0


def input_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of `uri` and its jsonl/json/parquet files (a file, or a directory's), in path order."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no input at {uri}")
    if info.type != pafs.FileType.Directory:
        return fs, [path]
    selector = pafs.FileSelector(path, recursive=True)
    suffixes = (".jsonl", ".json", ".parquet")
    return fs, sorted(
        i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File and i.path.endswith(suffixes)
    )


def file_records(name: str, stream) -> Iterator[Located]:
    """The records of one file (`stream`: a seekable binary file), read lazily.

    Parquet rows are numbered from 0, JSON Lines lines from 1 (blank lines skipped). A JSON
    line cut mid-write is a rejected record; a parquet file that cannot be read (cut short,
    its footer lost) is a ValueError naming it, since how many rows it held is unknown.
    """
    if name.endswith(".parquet"):
        i = 0
        try:
            for batch in pq.ParquetFile(stream).iter_batches():
                for rec in batch.to_pylist():
                    yield Located(rec, f"{name}:{i}", file=name, row=i)
                    i += 1
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{name}: unreadable parquet file after {i} rows (cut short or corrupt): {e}") from e
        return
    i = 0
    for physical in io.BufferedReader(stream):
        for raw in physical.splitlines():  # a lone "\r" ends a line too
            i += 1
            if raw.strip():
                yield _parse_line(raw, name, i)


def read_records(uri: str) -> Iterator[Located]:
    """Records of every jsonl/json/parquet file at `uri` (a file or a directory), in path order."""
    yield from records_of(*input_files(uri))


def records_of(fs: pafs.FileSystem, files: list[str]) -> Iterator[Located]:
    """The records of `files`, in order, read lazily (so the first costs one block, not a file)."""
    for name in files:
        with fs.open_input_file(name) as stream:
            yield from file_records(name, stream)


def _parse_line(raw: bytes, name: str, i: int) -> Located:
    location = f"{name}:{i}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        error = ("bad_encoding", f"not UTF-8: {e.reason}")
        return Located(None, location, raw.decode("utf-8", "replace"), error, name, i)
    try:
        return Located(json.loads(text), location, text, file=name, row=i)
    except json.JSONDecodeError as e:
        return Located(None, location, text, ("malformed_json", str(e)), name, i)
