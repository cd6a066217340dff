"""Ingest: every bad row rejected with its reason, good rows kept with stable ids."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignx_ray.build.ingest import (
    IngestConfig,
    Validator,
    ingest_records,
    run_ingest,
    tokenizer_validator,
)
from alignx_ray.build.readers import Located, read_records


def words(text: str) -> int:
    return len(text.split())


def first_words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def validate(records, **config):
    cfg = IngestConfig(max_post_tokens=50, max_response_tokens=20, **config)
    return ingest_records(records, Validator(cfg, words, first_words))


GOOD = {
    "thread_id": "t1",
    "post": "How do I fix a squeaky door?",
    "responses": [{"response_id": "a", "text": "Oil the hinges."}, {"text": "Tighten the screws first."}],
}

# (jsonl line, expected reason) — one per kind of malformed input.
BAD_LINES = [
    (b"{not json", "malformed_json"),
    (b'"just a string"', "not_an_object"),
    (b'\xff\xfe{"thread_id": "x"}', "bad_encoding"),
    (json.dumps({"post": "p", "responses": [{"text": "r"}]}).encode(), "missing_thread_id"),
    (json.dumps({"thread_id": ["x"], "post": "p", "responses": [{"text": "r"}]}).encode(), "bad_type_thread_id"),
    (json.dumps({"thread_id": "t1", "post": "p", "responses": [{"text": "r"}]}).encode(), "duplicate_thread_id"),
    (json.dumps({"thread_id": "t2", "responses": [{"text": "r"}]}).encode(), "missing_post"),
    (json.dumps({"thread_id": "t3", "post": "   ", "responses": [{"text": "r"}]}).encode(), "empty_post"),
    (json.dumps({"thread_id": "t4", "post": 42, "responses": [{"text": "r"}]}).encode(), "bad_type_post"),
    (json.dumps({"thread_id": "t5", "post": "p " * 60, "responses": [{"text": "r"}]}).encode(), "post_too_long"),
    (json.dumps({"thread_id": "t6", "post": "p"}).encode(), "missing_responses"),
    (json.dumps({"thread_id": "t7", "post": "p", "responses": "r"}).encode(), "bad_type_responses"),
    (
        json.dumps({"thread_id": "t8", "post": "bad \ud800 text", "responses": [{"text": "r"}]}).encode(),
        "bad_encoding_post",
    ),
    (json.dumps({"thread_id": "t9", "post": "p", "responses": ["r"]}).encode(), "bad_type_response"),
    (json.dumps({"thread_id": "t10", "post": "p", "responses": [{"response_id": "z"}]}).encode(), "missing_response"),
    (json.dumps({"thread_id": "t11", "post": "p", "responses": [{"text": ""}]}).encode(), "empty_response"),
    (json.dumps({"thread_id": "t12", "post": "p", "responses": [{"text": 3.5}]}).encode(), "bad_type_response"),
    (json.dumps({"thread_id": "t13", "post": "p", "responses": [{"text": "w " * 30}]}).encode(), "response_too_long"),
    (
        json.dumps({"thread_id": "t14", "post": "p", "responses": [{"response_id": "a", "text": "r"}]}).encode(),
        "duplicate_response_id",
    ),
    (
        json.dumps({"thread_id": "t15", "post": "p", "responses": [{"response_id": None, "text": "r"}]}).encode(),
        "bad_type_response_id",
    ),
    (
        json.dumps({"thread_id": "t16", "post": "p", "responses": [{"text": "mis\ufffddecoded"}]}).encode(),
        "bad_encoding_response",
    ),
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "threads.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode()] + [line for line, _ in BAD_LINES]) + b"\n")
    return path


def test_every_malformed_kind_is_rejected_with_its_reason(jsonl):
    result = validate(read_records(str(jsonl)))
    reasons = [r["reason"] for r in result.rejected]
    expected = [reason for _, reason in BAD_LINES]
    assert reasons == expected
    assert len(set(reasons)) >= 12
    assert all(r["location"].startswith(str(jsonl)) and r["detail"] for r in result.rejected)
    # Good rows survive, with a derived stable id for the response that had none.
    assert [(r["thread_id"], r["response_id"]) for r in result.responses] == [("t1", "a"), ("t1", "t1-r1")]


def test_truncation_instead_of_rejection():
    record = {"thread_id": "t", "post": "p", "responses": [{"text": "w " * 30}]}
    result = validate([Located(record, "mem:1")], truncate=True)
    assert not result.rejected
    assert result.responses[0]["response"] == " ".join(["w"] * 20)


def test_shp_rows_group_into_threads(tmp_path):
    rows = [
        {
            "post_id": "p1",
            "history": "Which pan?",
            "c_root_id_A": "c1",
            "c_root_id_B": "c2",
            "human_ref_A": "Cast iron.",
            "human_ref_B": "Steel.",
            "labels": 1,
        },
        {
            "post_id": "p1",
            "history": "Which pan?",
            "c_root_id_A": "c1",
            "c_root_id_B": "c3",
            "human_ref_A": "Cast iron.",
            "human_ref_B": "Non-stick.",
            "labels": 0,
        },
        {
            "post_id": "p2",
            "history": "Best knife?",
            "c_root_id_A": "c4",
            "c_root_id_B": "c5",
            "human_ref_A": "Chef's knife.",
            "human_ref_B": "",
            "labels": 1,
        },
        {"post_id": "p3", "history": "Broken row"},
    ]
    path = tmp_path / "shp.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = validate(read_records(str(path)))
    assert [(r["thread_id"], r["response_id"], r["response"]) for r in result.responses] == [
        ("p1", "c1", "Cast iron."),
        ("p1", "c2", "Steel."),
        ("p1", "c3", "Non-stick."),
        ("p2", "c4", "Chef's knife."),
    ]
    assert sorted(r["reason"] for r in result.rejected) == ["bad_shp_row", "empty_response"]


def test_run_ingest_writes_shards_and_rejected_rows(jsonl, tmp_path, tiny_model_dir, ray_local):
    out = tmp_path / "ingest"
    figures = run_ingest(IngestConfig(shard_rows=1), str(jsonl), out, str(tiny_model_dir))
    data = pq.read_table(out / "data")
    rejected = pq.read_table(out / "_rejected" / "ingest.parquet")
    # Every input row is accounted for: the good thread's 2 responses, one rejection per bad
    # line, except the two over-budget texts, which fit the default budgets (1024 / 512 tokens).
    assert data.num_rows == figures["responses"] == 4
    assert figures["shards"] == 4 and len(list((out / "data").glob("part-*.parquet"))) == 4
    assert rejected.num_rows == figures["rejected"] == len(BAD_LINES) - 2
    assert sum(figures["rejected_by_reason"].values()) == figures["rejected"]
    assert not (out / "_manifest.json").exists()  # the run stamps a stage's manifest, last


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input"):
        list(read_records(str(tmp_path / "nope.jsonl")))


def test_ray_stage_matches_the_in_process_core(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    """run_ingest on Ray keeps and rejects exactly what one ordered pass in process does:
    duplicate threads and responses across files (a response id first seen with a bad text is
    kept later), over-budget texts, and a truncated last line."""
    folder = tmp_path / "threads"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"\n".join([json.dumps(GOOD).encode()] + [line for line, _ in BAD_LINES]))
    later = [
        {"thread_id": "t1", "post": "again", "responses": [{"text": "r"}]},
        {"thread_id": "u1", "post": "p", "responses": [{"response_id": "d", "text": ""}, {"text": "x"}]},
        {"thread_id": "u2", "post": "p", "responses": [{"response_id": "d", "text": "kept"}, {"response_id": "d"}]},
        {"thread_id": "u3", "post": "p", "responses": [{"response_id": "d", "text": "dup"}, {"text": "w " * 40}]},
        {"thread_id": 7, "post": "numeric id", "responses": [{"response_id": 5, "text": "ok"}]},
    ]
    (folder / "b.jsonl").write_bytes(b"\n".join(json.dumps(r).encode() for r in later) + b'\n{"thread_id": "cut", "po')
    config = IngestConfig(max_post_tokens=16, max_response_tokens=8, shard_rows=3)
    out = tmp_path / "ingest"
    figures = run_ingest(config, str(folder), out, str(tiny_model_dir))
    expected = ingest_records(read_records(str(folder)), tokenizer_validator(config, tiny_tokenizer))

    def by_id(rows):
        return sorted(rows, key=lambda r: (r["response_id"] or "", r["location"] if "location" in r else ""))

    def by_place(rows):
        return sorted(rows, key=lambda r: (r["location"], r["reason"]))

    assert by_id(pq.read_table(out / "data").to_pylist()) == by_id(expected.responses)
    assert by_place(pq.read_table(out / "_rejected" / "ingest.parquet").to_pylist()) == by_place(expected.rejected)
    reasons = {r["reason"] for r in expected.rejected}
    assert {"duplicate_thread_id", "duplicate_response_id", "empty_response", "malformed_json"} <= reasons
    assert {r["response"] for r in expected.responses if r["response_id"] == "d"} == {"kept"}
    assert figures["responses"] == len(expected.responses) and figures["rejected"] == len(expected.rejected)
    assert figures["threads"] == len({r["thread_id"] for r in expected.responses})
