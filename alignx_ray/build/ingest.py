"""Ingest: forum threads (jsonl / parquet, local or any pyarrow filesystem URI) -> responses table.

One output row per response, `thread_id, response_id, post, response, source`, with stable
ids (a response without an id gets `<thread_id>-r<index>`). Every bad input row goes to the
rejected table with a reason; nothing is dropped silently. Ids must be unique across the
whole input, so validation runs as one ordered pass on the driver, streaming its output to
parquet shards that later stages read in parallel.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alignx_ray.common.config import Section
from alignx_ray.common.raydata import write_rejected
from alignx_ray.common.schema import RESPONSES_SCHEMA


class IngestConfig(Section):
    """What to read and how strictly.

    input: a file or directory (jsonl, json, parquet), local or a URI such as s3://bucket/threads/.
    format: `threads` ({thread_id, post, responses: [{response_id, text}]}), `shp` (one row per
        comment pair, SHP / ComPreD columns, grouped by post into threads), or `auto`.
    max_post_tokens / max_response_tokens: token budgets (annotation tokenizer); over budget
        is rejected, or cut to the budget when `truncate` is set.
    shard_rows: responses per output parquet file.
    """

    input: str | None = None
    format: Literal["auto", "threads", "shp"] = "auto"
    source: str = "forum"
    max_post_tokens: int = 1024
    max_response_tokens: int = 512
    truncate: bool = False
    shard_rows: int = 2000


@dataclass
class Located:
    """A record read from input, with where it came from; `error` set when unreadable."""

    record: object
    location: str
    raw: str = ""
    error: tuple[str, str] | None = None


@dataclass
class IngestResult:
    responses: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


def reject(reason: str, detail: str, item: Located, thread_id=None, response_id=None) -> dict:
    raw = item.raw or json.dumps(item.record, default=str, ensure_ascii=False)
    return {
        "stage": "ingest",
        "reason": reason,
        "detail": detail,
        "location": item.location,
        "thread_id": _as_text(thread_id),
        "response_id": _as_text(response_id),
        "raw": raw[:2000],
    }


def _as_text(value) -> str | None:
    return None if value is None else str(value)


def text_problem(value, what: str) -> tuple[str, str] | None:
    """(reason, detail) when a text field is unusable, else None."""
    if value is None:
        return f"missing_{what}", f"no {what}"
    if not isinstance(value, str):
        return f"bad_type_{what}", f"{what} is {type(value).__name__}, expected a string"
    if not value.strip():
        return f"empty_{what}", f"{what} is empty or whitespace"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"bad_encoding_{what}", f"{what} is not valid Unicode: {e.reason}"
    if "\x00" in value or "\ufffd" in value:
        return f"bad_encoding_{what}", f"{what} holds NUL or replacement characters (mis-decoded bytes)"
    return None


class Validator:
    """Turns located thread records into response rows or rejected rows.

    count_tokens / truncate_tokens come from the annotation tokenizer.
    """

    def __init__(
        self, config: IngestConfig, count_tokens: Callable[[str], int], truncate_tokens: Callable[[str, int], str]
    ):
        self.config = config
        self.count_tokens = count_tokens
        self.truncate_tokens = truncate_tokens
        self.thread_ids: set[str] = set()
        self.response_ids: set[str] = set()

    def budget(self, text: str, limit: int, what: str) -> tuple[str | None, tuple[str, str] | None]:
        n = self.count_tokens(text)
        if n <= limit:
            return text, None
        if self.config.truncate:
            return self.truncate_tokens(text, limit), None
        return None, (f"{what}_too_long", f"{what} has {n} tokens, over the budget of {limit}")

    def thread(self, item: Located, result: IngestResult) -> None:
        if item.error:
            result.rejected.append(reject(*item.error, item))
            return
        rec = item.record
        if not isinstance(rec, dict):
            result.rejected.append(reject("not_an_object", f"thread is {type(rec).__name__}", item))
            return
        tid = rec.get("thread_id")
        if tid is None or (isinstance(tid, str) and not tid.strip()):
            result.rejected.append(reject("missing_thread_id", "no thread_id", item))
            return
        if not isinstance(tid, (str, int)) or isinstance(tid, bool):
            result.rejected.append(reject("bad_type_thread_id", f"thread_id is {type(tid).__name__}", item))
            return
        tid = str(tid)
        if tid in self.thread_ids:
            result.rejected.append(reject("duplicate_thread_id", f"thread_id {tid} seen before", item, tid))
            return
        self.thread_ids.add(tid)
        post = rec.get("post")
        problem = text_problem(post, "post")
        if problem is None:
            post, problem = self.budget(post, self.config.max_post_tokens, "post")
        if problem:
            result.rejected.append(reject(*problem, item, tid))
            return
        responses = rec.get("responses")
        if not isinstance(responses, list) or not responses:
            reason = "missing_responses" if responses is None or responses == [] else "bad_type_responses"
            result.rejected.append(reject(reason, "responses must be a non-empty list", item, tid))
            return
        for j, resp in enumerate(responses):
            self.response(item, tid, post, j, resp, result)

    def response(self, item: Located, tid: str, post: str, j: int, resp, result: IngestResult) -> None:
        where = Located(resp, f"{item.location} responses[{j}]")
        if not isinstance(resp, dict):
            result.rejected.append(reject("bad_type_response", f"response is {type(resp).__name__}", where, tid))
            return
        rid = resp.get("response_id", f"{tid}-r{j}")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
            result.rejected.append(reject("bad_type_response_id", f"response_id {rid!r}", where, tid))
            return
        rid = str(rid)
        if rid in self.response_ids:
            result.rejected.append(reject("duplicate_response_id", f"response_id {rid} seen before", where, tid, rid))
            return
        text = resp.get("text")
        problem = text_problem(text, "response")
        if problem is None:
            text, problem = self.budget(text, self.config.max_response_tokens, "response")
        if problem:
            result.rejected.append(reject(*problem, where, tid, rid))
            return
        self.response_ids.add(rid)
        result.responses.append(
            {"thread_id": tid, "response_id": rid, "post": post, "response": text, "source": self.config.source}
        )


def shp_threads(rows: Iterable[Located]) -> Iterator[Located]:
    """SHP / ComPreD rows (one per comment pair) grouped by post into thread records.

    Columns used: post_id, history (the post), c_root_id_A/B (comment ids), human_ref_A/B (texts).
    A row without its ids is passed on as unreadable, so it is rejected with a reason; texts
    are validated like any thread's.
    """
    needed = ("post_id", "c_root_id_A", "c_root_id_B")
    threads: dict[str, dict] = {}
    where: dict[str, str] = {}
    comments: dict[str, dict[str, str]] = defaultdict(dict)
    for item in rows:
        rec = item.record
        missing = [k for k in needed if not isinstance(rec, dict) or rec.get(k) is None]
        if item.error or missing:
            yield (
                item if item.error else Located(rec, item.location, error=("bad_shp_row", f"missing columns {missing}"))
            )
            continue
        pid = str(rec["post_id"])
        threads.setdefault(pid, {"thread_id": pid, "post": rec.get("history")})
        where.setdefault(pid, item.location)
        for side in "AB":
            comments[pid].setdefault(str(rec[f"c_root_id_{side}"]), rec.get(f"human_ref_{side}"))
    for pid, thread in threads.items():
        thread["responses"] = [{"response_id": cid, "text": text} for cid, text in comments[pid].items()]
        yield Located(thread, where[pid])


def read_records(uri: str) -> Iterator[Located]:
    """Records of every jsonl/json/parquet file at `uri` (a file or a directory), in path order."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no input at {uri}")
    if info.type == pafs.FileType.Directory:
        files = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File and i.path.endswith((".jsonl", ".json", ".parquet"))
        )
    else:
        files = [path]
    for name in files:
        if name.endswith(".parquet"):
            for i, rec in enumerate(pq.read_table(name, filesystem=fs).to_pylist()):
                yield Located(rec, f"{name}:{i}")
            continue
        with fs.open_input_stream(name) as stream:
            data = stream.read()
        for i, raw in enumerate(data.splitlines(), 1):
            if raw.strip():
                yield _parse_line(raw, f"{name}:{i}")


def _parse_line(raw: bytes, location: str) -> Located:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Located(None, location, raw.decode("utf-8", "replace"), ("bad_encoding", f"not UTF-8: {e.reason}"))
    try:
        return Located(json.loads(text), location, text)
    except json.JSONDecodeError as e:
        return Located(None, location, text, ("malformed_json", str(e)))


def detect_format(first: Located) -> str:
    rec = first.record
    return "shp" if isinstance(rec, dict) and "human_ref_A" in rec else "threads"


def ingest_records(items: Iterable[Located], validator: Validator, fmt: str = "auto") -> IngestResult:
    """The pure core: validate every record (grouping SHP rows first when needed)."""
    items = iter(items)
    first = next(items, None)
    result = IngestResult()
    if first is None:
        return result
    chained = _prepend(first, items)
    fmt = detect_format(first) if fmt == "auto" else fmt
    for item in shp_threads(chained) if fmt == "shp" else chained:
        validator.thread(item, result)
    return result


def _prepend(first, rest):
    yield first
    yield from rest


def write_shards(rows: list[dict], schema: pa.Schema, out_dir, shard_rows: int) -> int:
    """Deterministic shards `part-00000.parquet`, ...; returns how many were written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, start in enumerate(range(0, max(len(rows), 1), shard_rows), 1):
        pq.write_table(
            pa.Table.from_pylist(rows[start : start + shard_rows], schema), out / f"part-{n - 1:05d}.parquet"
        )
    return n


def run_ingest(config: IngestConfig, input_uri: str, out_dir, tokenizer) -> dict:
    """Read, validate and shard; rejected rows to `_rejected/ingest.parquet`, manifest last."""
    started = time.time()
    out = Path(out_dir)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def cut(text: str, limit: int) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:limit])

    items = read_records(input_uri)
    result = ingest_records(items, Validator(config, count, cut), config.format)
    shards = write_shards(result.responses, RESPONSES_SCHEMA, out / "data", config.shard_rows)
    write_rejected(out, "ingest", result.rejected)
    reasons: dict[str, int] = defaultdict(int)
    for row in result.rejected:
        reasons[row["reason"]] += 1
    return {
        "input": input_uri,
        "responses": len(result.responses),
        "threads": len({r["thread_id"] for r in result.responses}),
        "rejected": len(result.rejected),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "shards": shards,
        "seconds": round(time.time() - started, 2),
    }
