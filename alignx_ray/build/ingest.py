"""Ingest: forum threads (jsonl / parquet, local or any pyarrow filesystem URI) -> responses table.

One output row per response, `thread_id, response_id, post, response, source`, with stable
ids (a response without an id gets `<thread_id>-r<index>`). Every bad input row goes to the
rejected table with a reason; nothing is dropped silently.

Ids must be unique across the whole input: of records sharing a thread id, and of valid
responses sharing a response id, the first in input order wins (files in path order, then
line or row, then place in the thread), exactly as one ordered pass keeping the ids it had
accepted. So the stage streams on Ray Data: files read in parallel -> records keyed by thread
-> groupby(thread) (duplicate threads rejected, SHP rows gathered into threads) -> validation
and token counting in an actor pool -> groupby(response_id) (duplicates rejected) ->
responses and rejects written as their own datasets. The driver holds file names and counts.
`ingest_records` runs the same steps in process.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FilenameProvider
from transformers import AutoTokenizer

from alignx_ray.build.readers import Located, file_records, input_files, records_of
from alignx_ray.common.config import PoolConfig, Section
from alignx_ray.common.raydata import actor_pool_args, as_rejected, shuffle_partitions, write_parquet
from alignx_ray.common.schema import REJECTED_SCHEMA, RESPONSES_SCHEMA


class IngestConfig(Section):
    """What to read and how strictly.

    input: a file or directory (jsonl, json, parquet), local or a URI such as s3://bucket/threads/.
    format: `threads` ({thread_id, post, responses: [{response_id, text}]}), `shp` (one row per
        comment pair, SHP / ComPreD columns, grouped by post into threads), or `auto`.
    max_post_tokens / max_response_tokens: token budgets (annotation tokenizer); over budget
        is rejected, or cut to the budget when `truncate` is set.
    shard_rows: responses per output parquet file.
    pool: the validation actors (each loads the tokenizer once); a batch is `pool.batch_size`
        threads. Each input file is read by one task, so a large input reads faster as many files.
    """

    input: str | None = None
    format: Literal["auto", "threads", "shp"] = "auto"
    source: str = "forum"
    max_post_tokens: int = 1024
    max_response_tokens: int = 512
    truncate: bool = False
    shard_rows: int = 2000
    pool: PoolConfig = PoolConfig(batch_size=256, concurrency=(1, 8), num_cpus=1)


@dataclass
class IngestResult:
    responses: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


# The rows between the steps: responses (`reason` null) and rejects (`reason` set), each with
# its place in the input (`file`, `row` of its record, `index` in its thread, -1 for the record
# itself) and `group`, the key of the next groupby (a thread or response id; the location of a
# row already decided, which only passes through). A record still to be gathered into its
# thread carries itself, pickled, in `item`: input values may be of any type (a post that is a
# number must be rejected as such), which no Arrow column holds.
STAGING_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("row", pa.int64()),
        ("index", pa.int64()),
        ("group", pa.string()),
        ("item", pa.binary()),
        ("thread_id", pa.string()),
        ("response_id", pa.string()),
        ("post", pa.string()),
        ("response", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("location", pa.string()),
        ("raw", pa.string()),
    ]
)
ORDER = [("file", "ascending"), ("row", "ascending"), ("index", "ascending")]
SHP_KEYS = ("post_id", "c_root_id_A", "c_root_id_B")


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


def staged(item: Located, index: int, row: dict) -> dict:
    """`row` at `item`'s place in the input; grouped next by its location unless it says."""
    return {"group": row["location"], **row, "file": item.file, "row": item.row, "index": index}


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


def thread_id_of(item: Located) -> tuple[str | None, tuple[str, str] | None]:
    """(thread id, None) of a thread record, or (None, (reason, detail)) when it has none."""
    rec = item.record
    if not isinstance(rec, dict):
        return None, ("not_an_object", f"thread is {type(rec).__name__}")
    tid = rec.get("thread_id")
    if tid is None or (isinstance(tid, str) and not tid.strip()):
        return None, ("missing_thread_id", "no thread_id")
    if not isinstance(tid, (str, int)) or isinstance(tid, bool):
        return None, ("bad_type_thread_id", f"thread_id is {type(tid).__name__}")
    return str(tid), None


def record_key(item: Located, fmt: str) -> tuple[str | None, tuple[str, str] | None]:
    """(the thread a record belongs to, None), or (None, (reason, detail)) rejecting it."""
    if item.error:
        return None, item.error
    if fmt == "threads":
        return thread_id_of(item)
    rec = item.record
    missing = [k for k in SHP_KEYS if not isinstance(rec, dict) or rec.get(k) is None]
    if missing:
        return None, ("bad_shp_row", f"missing columns {missing}")
    return str(rec["post_id"]), None


def shp_thread(rows: list[Located]) -> Located:
    """SHP / ComPreD rows of one post (one row per comment pair, in input order) as a thread.

    Columns used: post_id, history (the post), c_root_id_A/B (comment ids), human_ref_A/B
    (texts); a comment's first text wins. The thread sits at its first row's place.
    """
    first = rows[0]
    comments: dict[str, object] = {}
    for item in rows:
        for side in "AB":
            comments.setdefault(str(item.record[f"c_root_id_{side}"]), item.record.get(f"human_ref_{side}"))
    thread = {
        "thread_id": str(first.record["post_id"]),
        "post": first.record.get("history"),
        "responses": [{"response_id": cid, "text": text} for cid, text in comments.items()],
    }
    return Located(thread, first.location, file=first.file, row=first.row)


def thread_of_group(items: list[Located], fmt: str) -> tuple[Located, list[dict]]:
    """(the thread, rejected rows) of the records sharing one key, in input order: SHP rows
    gathered; of thread records the first, the others rejected as duplicates."""
    if fmt == "shp":
        return shp_thread(items), []
    tid = str(items[0].record["thread_id"])
    dups = [staged(i, -1, reject("duplicate_thread_id", f"thread_id {tid} seen before", i, tid)) for i in items[1:]]
    return items[0], dups


class Validator:
    """Turns a thread record into response rows and rejected rows (STAGING_SCHEMA dicts).

    count_tokens / truncate_tokens come from the annotation tokenizer. A response row whose
    text is unusable is already rejected, but keeps its id: a later response with that id may
    still be the one kept (see `first_responses`).
    """

    def __init__(
        self, config: IngestConfig, count_tokens: Callable[[str], int], truncate_tokens: Callable[[str, int], str]
    ):
        self.config = config
        self.count_tokens = count_tokens
        self.truncate_tokens = truncate_tokens

    def budget(self, text: str, limit: int, what: str) -> tuple[str | None, tuple[str, str] | None]:
        n = self.count_tokens(text)
        if n <= limit:
            return text, None
        if self.config.truncate:
            return self.truncate_tokens(text, limit), None
        return None, (f"{what}_too_long", f"{what} has {n} tokens, over the budget of {limit}")

    def thread(self, item: Located) -> list[dict]:
        tid, problem = thread_id_of(item)
        if problem is None:
            post = item.record.get("post")
            problem = text_problem(post, "post")
            if problem is None:
                post, problem = self.budget(post, self.config.max_post_tokens, "post")
        if problem is None:
            responses = item.record.get("responses")
            if not isinstance(responses, list) or not responses:
                reason = "missing_responses" if responses is None or responses == [] else "bad_type_responses"
                problem = reason, "responses must be a non-empty list"
        if problem:
            return [staged(item, -1, reject(*problem, item, tid))]
        return [self.response(item, tid, post, j, resp) for j, resp in enumerate(responses)]

    def response(self, item: Located, tid: str, post: str, j: int, resp) -> dict:
        where = Located(resp, f"{item.location} responses[{j}]")
        if not isinstance(resp, dict):
            return staged(item, j, reject("bad_type_response", f"response is {type(resp).__name__}", where, tid))
        rid = resp.get("response_id", f"{tid}-r{j}")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
            return staged(item, j, reject("bad_type_response_id", f"response_id {rid!r}", where, tid))
        rid = str(rid)
        text = resp.get("text")
        problem = text_problem(text, "response")
        if problem is None:
            text, problem = self.budget(text, self.config.max_response_tokens, "response")
        row = reject(*(problem or (None, None)), where, tid, rid)
        return staged(item, j, {**row, "group": rid, "post": post, "response": None if problem else text})


def tokenizer_validator(config: IngestConfig, tokenizer) -> Validator:
    """A Validator counting and cutting tokens of a Hugging Face tokenizer (no special tokens)."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def cut(text: str, limit: int) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:limit])

    return Validator(config, count, cut)


def first_responses(rows: pa.Table) -> pa.Table:
    """Response rows with their duplicates rejected: of the rows sharing an id, the first in
    input order whose text is usable is kept, those after it are rejected as duplicates and
    those before it keep their own reason (what one ordered pass keeping the ids it accepted
    does). Rows without a response id pass through. Any table holding whole id groups."""
    if rows.num_rows < 2:
        return rows
    rows = rows.sort_by([("response_id", "ascending"), *ORDER])
    ids = rows["response_id"]
    pending = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    usable = pending & pc.is_null(rows["reason"]).to_numpy(zero_copy_only=False)
    codes = pc.fill_null(pc.dictionary_encode(ids.combine_chunks()).indices, -1).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    position = np.arange(rows.num_rows)
    first = np.minimum.reduceat(np.where(usable, position, rows.num_rows), starts)
    duplicate = pa.array(pending & (position > np.repeat(first, np.diff(np.r_[starts, rows.num_rows]))))
    detail = pc.binary_join_element_wise("response_id ", ids, " seen before", "")
    rows = rows.set_column(
        rows.schema.get_field_index("reason"), "reason", pc.if_else(duplicate, "duplicate_response_id", rows["reason"])
    )
    return rows.set_column(
        rows.schema.get_field_index("detail"), "detail", pc.if_else(duplicate, detail, rows["detail"])
    )


def responses_of(rows: pa.Table, source: str) -> pa.Table:
    """The kept responses of staging rows, in RESPONSES_SCHEMA."""
    kept = rows.filter(pc.is_null(rows["reason"]))
    columns = {f.name: kept[f.name] for f in RESPONSES_SCHEMA if f.name != "source"}
    return pa.table({**columns, "source": pa.array([source] * kept.num_rows, pa.string())}, RESPONSES_SCHEMA)


def rejects_of(rows: pa.Table) -> pa.Table:
    """The rejected rows of staging rows, in REJECTED_SCHEMA."""
    return as_rejected(rows.filter(pc.is_valid(rows["reason"])), "ingest")


def reason_counts(rejects: pa.Table) -> pa.Table:
    """Rejected rows per reason in one block (`reason`, `reason_count`): partial counts the
    driver adds up, a row per reason and block, so no shuffle is needed."""
    return rejects.group_by("reason").aggregate([("reason", "count")])


def detect_format(first: Located) -> str:
    rec = first.record
    return "shp" if isinstance(rec, dict) and "human_ref_A" in rec else "threads"


def ingest_records(items: Iterable[Located], validator: Validator, fmt: str = "auto") -> IngestResult:
    """The pure core, in process and in input order: the steps the Ray layer runs in parallel."""
    items = [replace(item, file="", row=n) for n, item in enumerate(items)]
    if not items:
        return IngestResult()
    fmt = detect_format(items[0]) if fmt == "auto" else fmt
    rows, groups = [], defaultdict(list)
    for item in items:
        key, problem = record_key(item, fmt)
        if problem:
            rows.append(staged(item, -1, reject(*problem, item)))
        else:
            groups[key].append(item)
    for group in groups.values():
        thread, duplicates = thread_of_group(group, fmt)
        rows += duplicates + validator.thread(thread)
    table = first_responses(pa.Table.from_pylist(rows, STAGING_SCHEMA)).sort_by(ORDER)
    return IngestResult(responses_of(table, validator.config.source).to_pylist(), rejects_of(table).to_pylist())


# The Ray layer.

CHUNK_ROWS = 4096  # records per block out of the read step, so one large file streams


def parse_files(files: pa.Table, fmt: str) -> Iterator[pa.Table]:
    """Records of read_binary_files' rows (`path`, `bytes`), keyed by thread or rejected."""
    for name, data in zip(files["path"].to_pylist(), files["bytes"].to_pylist(), strict=True):
        rows = []
        for item in file_records(name, pa.BufferReader(data)):
            key, problem = record_key(item, fmt)
            if problem:
                rows.append(staged(item, -1, reject(*problem, item)))
            else:
                rows.append(staged(item, -1, {"group": key, "item": pickle.dumps(item), "location": item.location}))
            if len(rows) == CHUNK_ROWS:
                yield pa.Table.from_pylist(rows, STAGING_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, STAGING_SCHEMA)


def gather_threads(rows: pa.Table, fmt: str) -> pa.Table:
    """One group's records as its thread (still pickled) and its rejected duplicates."""
    pending = pc.is_valid(rows["item"])
    done = rows.filter(pc.invert(pending))
    records = rows.filter(pending).sort_by(ORDER)
    if records.num_rows == 0:
        return done
    thread, duplicates = thread_of_group([pickle.loads(b) for b in records["item"].to_pylist()], fmt)
    row = staged(thread, -1, {"group": thread.location, "item": pickle.dumps(thread), "location": thread.location})
    return pa.concat_tables([done, pa.Table.from_pylist([row, *duplicates], STAGING_SCHEMA)])


class ValidateThreads:
    """Validation and token counting of gathered threads; the tokenizer is loaded once per actor."""

    def __init__(self, config: IngestConfig, tokenizer: str):
        self.validator = tokenizer_validator(config, AutoTokenizer.from_pretrained(tokenizer))

    def __call__(self, rows: pa.Table) -> pa.Table:
        pending = pc.is_valid(rows["item"])
        out = [r for b in rows.filter(pending)["item"].to_pylist() for r in self.validator.thread(pickle.loads(b))]
        return pa.concat_tables([rows.filter(pc.invert(pending)), pa.Table.from_pylist(out, STAGING_SCHEMA)])


class PartFiles(FilenameProvider):
    """`part-<write>-<task>-<i>.parquet`: the shard names later stages and tools expect."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06}"


def run_ingest(config: IngestConfig, input_uri: str, out_dir, tokenizer: str) -> dict:
    """read_binary_files -> parse -> groupby(thread) -> validate (actors loading `tokenizer`, a
    name or path) -> groupby(response_id) -> staging, split into `data/` shards and the rejects
    `_rejected/ingest.parquet/` (a dataset folder); the driver reads file names and counts."""
    started = time.time()
    out = Path(out_dir).resolve()
    staging, data, rejected = out / "_staging", out / "data", out / "_rejected" / "ingest.parquet"
    for folder in (staging, data, rejected):  # a killed run's partial output must not be appended to
        shutil.rmtree(folder, ignore_errors=True)
    staging.mkdir(parents=True)
    pq.write_table(STAGING_SCHEMA.empty_table(), staging / "empty.parquet")  # the input may have no record
    fs, files = input_files(input_uri)
    partitions = shuffle_partitions(size=sum(info.size or 0 for info in fs.get_file_info(files)))
    if files:
        first = next(records_of(fs, files), None)
        fmt = detect_format(first) if config.format == "auto" and first else config.format
        keyed = ray.data.read_binary_files(files, filesystem=fs, include_paths=True).map_batches(
            parse_files, fn_kwargs={"fmt": fmt}, batch_size=1, batch_format="pyarrow"
        )
        threads = keyed.groupby("group", num_partitions=partitions).map_groups(
            gather_threads, fn_args=(fmt,), batch_format="pyarrow"
        )
        validated = threads.map_batches(
            ValidateThreads,
            fn_constructor_kwargs={"config": config, "tokenizer": tokenizer},
            batch_format="pyarrow",
            **actor_pool_args(config.pool),
        )
        deduped = validated.groupby("group", num_partitions=partitions).map_groups(
            first_responses, batch_format="pyarrow"
        )
        write_parquet(deduped, staging)
    staged_rows = ray.data.read_parquet(str(staging))
    kept = staged_rows.map_batches(responses_of, fn_args=(config.source,), batch_format="pyarrow")
    kept.write_parquet(
        str(data),
        filename_provider=PartFiles(),
        min_rows_per_file=config.shard_rows,
        max_rows_per_file=config.shard_rows,
    )
    staged_rows.map_batches(rejects_of, batch_format="pyarrow").write_parquet(str(rejected))
    for folder, schema in ((data, RESPONSES_SCHEMA), (rejected, REJECTED_SCHEMA)):
        if not any(folder.glob("*.parquet")):  # readers of an empty table still find its schema
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(schema.empty_table(), folder / "part-empty.parquet")
    threads = kept.select_columns(["thread_id"]).groupby("thread_id", num_partitions=partitions).count().count()
    shutil.rmtree(staging)
    by_reason: dict[str, int] = defaultdict(int)
    for part in ray.data.read_parquet(str(rejected)).map_batches(reason_counts, batch_format="pyarrow").iter_rows():
        by_reason[part["reason"]] += part["reason_count"]
    return {
        "input": input_uri,
        "responses": ray.data.read_parquet(str(data)).count(),
        "threads": threads,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "shards": len(list(data.glob("*.parquet"))),
        "seconds": round(time.time() - started, 2),
    }
