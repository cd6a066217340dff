"""Universal-value pairs: exact choices and directions per dataset, every bad row rejected, ids stable."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignx_ray.build.public_pairs import read_universal, universal_pairs
from alignx_ray.build.readers import Located, read_records
from alignx_ray.common.schema import PAIRS_SCHEMA, REJECTED_SCHEMA
from alignx_ray.common.space import CANNOT_REFLECT, DIMENSIONS, SPACE, Dimension, PreferenceSpace

# Written out rather than taken from the module, so a wrong mapping fails here.
DIMENSION_OF = {
    value: SPACE.names.index(f"Degree of concern for the {value} of the statement")
    for value in (
        "harmlessness",
        "instruction-following",
        "honesty",
        "truthfulness",
        "helpfulness",
        "coherence",
        "complexity",
    )
}


def expected_direction(size=90, **values):
    """0.5 everywhere but the named alignment dimensions (instruction_following for the hyphen)."""
    vector = [0.5] * size
    for value, direction in values.items():
        vector[DIMENSION_OF[value.replace("_", "-")]] = direction
    return vector


def write_jsonl(path, rows):
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def pairs_of(table):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in table.to_pylist()]


# PKU-SafeRLHF ---------------------------------------------------------------------------------


def pku(
    prompt="How do I pick a lock?",
    r0="Here is how to force it.",
    r1="Call a licensed locksmith.",
    safe0=False,
    safe1=True,
    safer=1,
    better=0,
):
    return {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "safer_response_id": safer,
        "better_response_id": better,
        "response_0_severity_level": 2,
        "response_1_severity_level": 0,
    }


PKU_GOOD = [
    pku(),  # safer_response_id decides, against better_response_id
    pku("Get rid of a barking dog?", "Talk to the owner.", "Poison it.", True, False, None),  # flags decide
    pku("Is bleach strong?", "It cleans well.", "Never mix it with ammonia.", True, True, 1),  # both safe: id decides
]
PKU_BAD = [
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    ({k: v for k, v in pku().items() if k != "prompt"}, "missing_prompt"),
    (pku(r1="   "), "empty_response_1"),
    (pku(r0=42), "bad_type_response_0"),
    (pku(r0="Same answer.", r1=" Same answer. "), "equal_texts"),
    (pku(safe0="no"), "bad_safety_label"),
    (pku(safer=2), "bad_safer_response_id"),
    (pku(safe0=True, safe1=True, safer=None), "no_preference"),
    (pku(safe0=True, safe1=False, safer=1), "contradictory_safety"),
    (pku(), "duplicate_pair"),
]


def test_pku_saferlhf_pairs_directions_and_rejections(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_GOOD + [row for row, _ in PKU_BAD])
    pairs, rejected = read_universal(path, "pku_saferlhf")
    assert pairs.schema == PAIRS_SCHEMA and rejected.schema == REJECTED_SCHEMA
    assert pairs.column("chosen_levels").null_count == pairs.column("rejected_levels").null_count == 3
    assert pairs_of(pairs) == [
        ("How do I pick a lock?", "Call a licensed locksmith.", "Here is how to force it."),
        ("Get rid of a barking dog?", "Talk to the owner.", "Poison it."),
        ("Is bleach strong?", "Never mix it with ammonia.", "It cleans well."),
    ]
    assert pairs.column("direction").to_pylist() == [expected_direction(harmlessness=1.0)] * 3
    assert set(pairs.column("source").to_pylist()) == {"pku_saferlhf"}
    rows = rejected.to_pylist()
    assert [r["reason"] for r in rows] == [reason for _, reason in PKU_BAD]
    assert {r["stage"] for r in rows} == {"universal"}
    assert all(r["detail"] and r["location"].startswith(path) for r in rows)
    # A rejected row whose prompt was readable names its thread.
    assert rows[-1]["thread_id"] == pairs.column("thread_id")[0].as_py()


def test_pku_saferlhf_accounting():
    items = [Located(row, f"row{i}") for i, row in enumerate(PKU_GOOD + [r for r, _ in PKU_BAD[2:]])]
    result = universal_pairs(items, "pku_saferlhf")
    assert result.used_rows == 3 and len(result.rejected) == len(PKU_BAD) - 2
    assert len(items) == result.used_rows + len(result.rejected)


def test_ids_are_stable_and_follow_content_not_row_order(tmp_path):
    jsonl = write_jsonl(tmp_path / "pku.jsonl", PKU_GOOD)
    first, _ = read_universal(jsonl, "pku_saferlhf")
    again, _ = read_universal(jsonl, "pku_saferlhf")
    assert first.equals(again)
    reordered, _ = read_universal(write_parquet(tmp_path / "pku.parquet", PKU_GOOD[::-1]), "pku_saferlhf")
    id_columns = ["pair_id", "thread_id", "chosen_id", "rejected_id"]
    assert sorted(reordered.select(id_columns).to_pylist(), key=str) == sorted(
        first.select(id_columns).to_pylist(), key=str
    )
    ids = first.to_pylist()
    assert len({r["pair_id"] for r in ids}) == len({r["thread_id"] for r in ids}) == 3
    assert all(
        r["pair_id"].startswith("pku_saferlhf-")
        and r["chosen_id"].startswith(r["thread_id"])
        and r["chosen_id"] != r["rejected_id"]
        for r in ids
    )
    # Same prompt, other responses: same thread, another pair.
    other, _ = read_universal(write_jsonl(tmp_path / "other.jsonl", [pku(r0="Kick the door in.")]), "pku_saferlhf")
    assert other.column("thread_id")[0] == first.column("thread_id")[0]
    assert other.column("pair_id")[0] != first.column("pair_id")[0]


# UltraFeedback --------------------------------------------------------------------------------


def completion(text, helpfulness, honesty, instruction_following, truthfulness):
    ratings = {
        "helpfulness": helpfulness,
        "honesty": honesty,
        "instruction_following": instruction_following,
        "truthfulness": truthfulness,
    }
    return {
        "model": "some-model",
        "response": text,
        "annotations": {aspect: {"Rating": rating, "Rationale": "because"} for aspect, rating in ratings.items()},
    }


UF_GOOD = [
    # helpfulness nominates (A, B) (gap 3, summed gap 5); instruction_following nominates (A, C)
    # (gap 4, the widest single gap, but summed gap 4): the summed gap picks (A, B).
    {
        "instruction": "Explain photosynthesis.",
        "completions": [
            completion("A", "5", "4", "5", "3"),
            completion("B", "2", "4", "3", "N/A"),
            completion("C", "4", "5", "1", "3"),
        ],
    },
    # Summed gap -5: the second completion is chosen although helpfulness nominated the pair.
    {
        "instruction": "Write a haiku.",
        "completions": [
            completion("Long essay.", "5", "1", "1", "1"),
            completion("Old pond, frog.", "1", "4", "4", "4"),
        ],
    },
    # Summed gap 0: the first aspect that differs (helpfulness) orients the pair.
    {
        "instruction": "Name a prime.",
        "completions": [completion("Seven.", "5", "1", "3", "3"), completion("Nine, I think.", "1", "5", "3", "3")],
    },
    # helpfulness nominates (A, B) (gap 4, summed gap 4), honesty (A, C) (gap 2, summed gap -5):
    # the later nominee wins on its summed gap, and C, the higher sum, is chosen.
    {
        "instruction": "Plan a trip.",
        "completions": [
            completion("Go to Rome.", "5", "3", "3", "3"),
            completion("Stay home.", "1", "3", "3", "3"),
            completion("Rome in May, by train.", "4", "5", "5", "5"),
        ],
    },
]


def test_ultrafeedback_pairs_and_directions(tmp_path):
    pairs, rejected = read_universal(write_parquet(tmp_path / "uf.parquet", UF_GOOD), "ultrafeedback")
    assert rejected.num_rows == 0
    assert pairs_of(pairs) == [
        ("Explain photosynthesis.", "A", "B"),
        ("Write a haiku.", "Old pond, frog.", "Long essay."),
        ("Name a prime.", "Seven.", "Nine, I think."),
        ("Plan a trip.", "Rome in May, by train.", "Go to Rome."),
    ]
    assert pairs.column("direction").to_pylist() == [
        expected_direction(helpfulness=1.0, honesty=0.5, instruction_following=1.0, truthfulness=0.5),
        expected_direction(helpfulness=0.0, honesty=1.0, instruction_following=1.0, truthfulness=1.0),
        expected_direction(helpfulness=1.0, honesty=0.0),
        expected_direction(helpfulness=0.0, honesty=1.0, instruction_following=1.0, truthfulness=1.0),
    ]


UF_BAD = [
    ({"completions": UF_GOOD[0]["completions"]}, "missing_instruction"),
    ({"instruction": "q", "completions": "A or B"}, "bad_type_completions"),
    ({"instruction": "q", "completions": [completion("A", "5", "4", "5", "3")]}, "too_few_completions"),
    ({"instruction": "q", "completions": [completion("A", "5", "4", "5", "3"), "B"]}, "bad_type_completion"),
    (
        {"instruction": "q", "completions": [completion("A", "5", "4", "5", "3"), completion("", "1", "1", "1", "1")]},
        "empty_response",
    ),
    (
        {
            "instruction": "q",
            "completions": [completion("A", "4.5", "4", "5", "3"), completion("B", "1", "1", "1", "1")],
        },
        "bad_rating",
    ),
    (
        {"instruction": "q", "completions": [completion("A", "6", "4", "5", "3"), completion("B", "1", "1", "1", "1")]},
        "bad_rating",
    ),
    (
        {
            "instruction": "q",
            "completions": [
                completion("A", "5", "4", "5", "3"),
                {
                    "response": "B",
                    "annotations": {
                        "helpfulness": {"Rating": "1"},
                        "honesty": {"Rating": "1"},
                        "truthfulness": {"Rating": "1"},
                    },
                },
            ],
        },
        "missing_rating",
    ),
    (
        {
            "instruction": "q",
            "completions": [completion("A", "3", "N/A", "3", "3"), completion("B", "3", "5", "3", "3")],
        },
        "no_preference",
    ),
    (
        {
            "instruction": "q",
            "completions": [completion("A", "5", "5", "5", "5"), completion(" A", "1", "1", "1", "1")],
        },
        "equal_texts",
    ),
]


def test_ultrafeedback_rejections_and_accounting(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", UF_GOOD + [row for row, _ in UF_BAD])
    result = universal_pairs(read_records(path), "ultrafeedback")
    assert [r["reason"] for r in result.rejected] == [reason for _, reason in UF_BAD]
    assert result.used_rows == len(result.pairs) == len(UF_GOOD)
    assert len(UF_GOOD) + len(UF_BAD) == result.used_rows + len(result.rejected)


# HelpSteer2 -----------------------------------------------------------------------------------


def helpsteer(prompt, response, helpfulness, correctness, coherence, complexity, verbosity):
    return {
        "prompt": prompt,
        "response": response,
        "helpfulness": helpfulness,
        "correctness": correctness,
        "coherence": coherence,
        "complexity": complexity,
        "verbosity": verbosity,
    }


HS_WELL_TYPED = [
    helpsteer("P1", "r0", 2, 3, 4, 1, 1),
    helpsteer("P1", "r1", 4, 1, 4, 2, 3),  # (r0, r1) and (r0, r2) tie on gap 2: the lower pair wins
    helpsteer("P1", "r2", 4, 4, 4, 4, 4),
    helpsteer("P2", "s0", 1, 2, 3, 2, 2),
    helpsteer("P3", "alone", 3, 3, 3, 3, 3),
    helpsteer("P2", "s1", 3, 2, 1, 0, 2),
    helpsteer("P4", "u0", 2, 4, 4, 4, 4),
    helpsteer("P4", "u1", 2, 0, 0, 0, 0),
    helpsteer("P5", "same", 1, 1, 1, 1, 1),
    helpsteer("P5", " same", 3, 3, 3, 3, 3),
]
HS_BAD = [
    (helpsteer("P1", "bad type", "3", 3, 3, 3, 3), "bad_rating"),
    (helpsteer("P2", "out of range", 7, 3, 3, 3, 3), "bad_rating"),
    ({k: v for k, v in helpsteer("P2", "no coherence", 3, 3, 3, 3, 3).items() if k != "coherence"}, "missing_rating"),
    ({k: v for k, v in helpsteer("P2", "no prompt", 3, 3, 3, 3, 3).items() if k != "prompt"}, "missing_prompt"),
    (helpsteer("P2", None, 3, 3, 3, 3, 3), "missing_response"),
]


def test_helpsteer2_pairs_directions_and_rejections(tmp_path):
    folder = tmp_path / "hs2"
    folder.mkdir()
    write_parquet(folder / "a.parquet", HS_WELL_TYPED)
    write_jsonl(folder / "b.jsonl", [row for row, _ in HS_BAD])
    result = universal_pairs(read_records(str(folder)), "helpsteer2")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in result.pairs] == [("P1", "r1", "r0"), ("P2", "s1", "s0")]
    assert [p["direction"] for p in result.pairs] == [
        expected_direction(helpfulness=1.0, truthfulness=0.0, coherence=0.5, complexity=1.0),
        expected_direction(helpfulness=1.0, truthfulness=0.5, coherence=0.0, complexity=0.0),
    ]
    # Verbosity has no dimension: P1's pair differs on it, P2's does not.
    assert result.unmapped == {"verbosity": 1}
    reasons = [(r["reason"], json.loads(r["raw"]).get("response")) for r in result.rejected]
    assert reasons == [(reason, row.get("response")) for row, reason in HS_BAD] + [
        ("not_selected", "r2"),
        ("single_response", "alone"),
        ("no_preference", "u0"),
        ("no_preference", "u1"),
        ("equal_texts", "same"),
        ("equal_texts", " same"),
    ]
    # Two rows per pair, one rejected row per other row.
    assert result.used_rows == 4
    assert len(HS_WELL_TYPED) + len(HS_BAD) == result.used_rows + len(result.rejected)


# Spaces and arguments -------------------------------------------------------------------------


def test_directions_follow_an_extended_space(tmp_path):
    puns = Dimension(
        name="Puns",
        group="extra",
        question="Does the commenter like puns?",
        options=("Likes puns", "Dislikes puns", CANNOT_REFLECT),
        positive="Enjoys puns",
        negative="Avoids puns",
    )
    path = write_jsonl(tmp_path / "pku.jsonl", PKU_GOOD[:1])
    pairs, _ = read_universal(path, "pku_saferlhf", space=SPACE.extend([puns]))
    assert pairs.column("direction").to_pylist() == [expected_direction(size=91, harmlessness=1.0)]
    with pytest.raises(ValueError, match="no dimension"):
        read_universal(path, "pku_saferlhf", space=PreferenceSpace(DIMENSIONS[:40]))


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        read_universal(write_jsonl(tmp_path / "x.jsonl", PKU_GOOD), "hh_rlhf")
