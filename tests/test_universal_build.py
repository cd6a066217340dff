"""Universal-value examples in the build: P_PAIR drawn from peers of the same source, train only,
counted per source and dimension (Table 1)."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cpu import DEMO
from test_universal import completion, helpsteer, pku, write_jsonl, write_parquet

from alignx_ray.build.assemble import JOINED_SCHEMA, AssembleConfig, run_assemble
from alignx_ray.build.pairs import run_pairs
from alignx_ray.build.personas import PersonaConfig, consistent, run_personas
from alignx_ray.build.public_pairs import FORUM, SOURCES, concern, is_universal, source_dimensions, sources_of
from alignx_ray.build.stats import source_counts, split_sources, table1
from alignx_ray.build.test_draw import cell_candidates
from alignx_ray.build.universal import (
    PeerGroups,
    UniversalConfig,
    UniversalSource,
    code_directions,
    direction_codes,
    persona_rows,
    run_universal,
)
from alignx_ray.common import schema
from alignx_ray.common.space import SPACE
from alignx_ray.fixtures import synthetic

# The sampler without Ray -------------------------------------------------------------------------

DIMS = [3, 7]  # two rated dimensions of a 10-dimension space
N_DIMS = 10


def vector(a: float, b: float) -> list[float]:
    out = [0.5] * N_DIMS
    out[DIMS[0]], out[DIMS[1]] = a, b
    return out


def groups_of(rows: list[tuple[str, str, list[float]]]) -> PeerGroups:
    ids, threads, directions = zip(*rows)
    codes = direction_codes(np.array(directions), DIMS)
    return PeerGroups.of(pa.array(ids), pa.array(threads), codes, DIMS, N_DIMS)


# (pair id, thread, direction): x / y pairs agree, z contradicts both on the first dimension.
POOL = (
    [(f"x{i}", f"t{i}", vector(1.0, 0.5)) for i in range(6)]
    + [(f"y{i}", f"u{i}", vector(1.0, 1.0)) for i in range(4)]
    + [("x-mate", "t0", vector(1.0, 0.5)), ("z0", "v0", vector(0.0, 1.0))]
)


def test_codes_round_trip():
    directions = np.array([vector(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)])
    codes = direction_codes(directions, DIMS)
    assert len(set(codes.tolist())) == 9
    assert np.array_equal(code_directions(codes, DIMS, N_DIMS), directions)


def test_draw_samples_consistent_peers_of_other_prompts_without_itself():
    groups = groups_of(POOL)
    directions = {pid: np.array(d) for pid, _, d in POOL}
    threads = {pid: t for pid, t, _ in POOL}
    for pair_id, thread, direction in POOL:
        row = int(groups.rows_of(pa.array([pair_id]))[0])
        expected = {
            p for p, t, d in POOL if p != pair_id and t != thread and consistent(np.array(d), np.array(direction))[0]
        }
        seen = set()
        for k in range(40):
            rows, available = groups.draw(row, 3, np.random.default_rng(k))
            assert available == len(expected)
            drawn = groups.ids.take(rows).to_pylist()
            assert len(drawn) == len(set(drawn)) == min(3, len(expected))
            assert set(drawn) <= expected and pair_id not in drawn
            assert all(threads[p] != thread for p in drawn)
            assert np.array_equal(
                groups.directions[groups.groups[rows]], np.array([directions[p] for p in drawn]).reshape(-1, N_DIMS)
            )
            seen |= set(drawn)
        assert seen == expected  # every peer can be drawn
    # x0 shares its prompt with x-mate: 4 other x and 4 y pairs; z0 contradicts everyone.
    assert groups.draw(int(groups.rows_of(pa.array(["x0"]))[0]), 99, np.random.default_rng(0))[1] == 9
    assert groups.draw(int(groups.rows_of(pa.array(["z0"]))[0]), 99, np.random.default_rng(0))[1] == 0


def test_groups_do_not_depend_on_input_order():
    a, b = groups_of(POOL), groups_of(POOL[::-1])
    assert a.ids.equals(b.ids) and np.array_equal(a.peers, b.peers) and np.array_equal(a.groups, b.groups)


def test_draw_is_uniform_over_peers():
    groups = groups_of(POOL)
    row = int(groups.rows_of(pa.array(["y0"]))[0])
    counts = Counter()
    for k in range(3000):
        counts.update(groups.ids.take(groups.draw(row, 2, np.random.default_rng(k))[0]).to_pylist())
    assert len(counts) == 10  # 7 x and 3 other y pairs
    assert max(counts.values()) / min(counts.values()) < 1.35


def test_draw_scales_with_items_not_pairs():
    n = 200_000
    rng = np.random.default_rng(0)
    directions = np.full((n, N_DIMS), 0.5)
    directions[:, DIMS] = rng.choice([0.0, 0.5, 1.0], (n, 2))
    ids = pa.array([f"p{i:06d}" for i in range(n)])
    groups = PeerGroups.of(ids, ids, direction_codes(directions, DIMS), DIMS, N_DIMS)
    assert groups.peers.shape == (9, 9)
    rows, available = groups.draw(5, 8, np.random.default_rng(1))
    assert len(rows) == 8 and available > n // 4  # row 5 is (negative, negative): a third of the pairs


def test_persona_rows_range_seeding_and_too_few_peers():
    groups = {"ultrafeedback": groups_of(POOL)}
    pairs = pa.table(
        {
            "pair_id": [p for p, _, _ in POOL],
            "thread_id": [t for _, t, _ in POOL],
            "source": ["ultrafeedback"] * len(POOL),
        }
    )
    config = UniversalConfig(min_items=2, max_items=4, seed=3)
    out = persona_rows(pairs, groups, config)
    assert out.schema.names[: len(schema.PERSONAS_SCHEMA)] == schema.PERSONAS_SCHEMA.names
    rows = {r["pair_id"]: r for r in out.to_pylist()}
    assert rows["z0"]["reason"] == "too_few_peers" and rows["z0"]["pair_feedback"] == []
    assert rows["z0"]["pair_direction"] is None
    for pair_id, _, _ in POOL[:-1]:
        r = rows[pair_id]
        assert r["reason"] is None and r["ugc"] == [] and r["ugc_direction"] is None
        assert 2 <= len(r["pair_feedback"]) == r["items"] <= 4
        assert r["pair_direction"][DIMS[0]] == 1.0  # every item agrees on the shared dimension
    # Seeded by pair id: the same in any batch, in any order; another seed draws otherwise.
    again = persona_rows(pairs.take(np.arange(len(POOL))[::-1]), groups, config)
    assert again.sort_by("pair_id").equals(out.sort_by("pair_id"))
    other = persona_rows(pairs, groups, UniversalConfig(min_items=2, max_items=4, seed=4))
    assert other["pair_feedback"] != out["pair_feedback"]


def test_items_range_is_validated():
    with pytest.raises(ValueError, match="min_items"):
        UniversalConfig(min_items=5, max_items=2)
    assert set(UniversalSource.model_fields["source"].annotation.__args__) == set(SOURCES)


def test_sources_from_ids_and_test_split_is_forum_only():
    ids = pa.array(["pku_saferlhf-0123456789abcdef", "t1-r0>t1-r2", "helpsteer2-fedcba9876543210", "alignx-7"])
    assert sources_of(ids).to_pylist() == ["pku_saferlhf", FORUM, "helpsteer2", FORUM]
    direction = [0.5] * 90
    direction[source_dimensions("pku_saferlhf")[0]] = 1.0
    item = {"direction": direction}
    row = {"direction": direction, "ugc": [item] * 4, "pair_feedback": [item] * 4, "ugc_items": 4, "pair_items": 4}
    rows = [{**row, "pair_id": "pku_saferlhf-0123456789abcdef"}, {**row, "pair_id": "t1-r0>t1-r2"}]
    rows = [
        {**r, "ugc_direction": direction, "pair_direction": direction, "ugc_items": 4, "pair_items": 4} for r in rows
    ]
    candidates = cell_candidates(pa.Table.from_pylist(rows, JOINED_SCHEMA), AssembleConfig())
    assert set(candidates["pair_id"].to_pylist()) == {"t1-r0>t1-r2"}
    assert is_universal(rows[0]["pair_id"]) and not is_universal(rows[1]["pair_id"])


# The stage and assembly on Ray -----------------------------------------------------------------


def uf_row(instruction: str, a: tuple, b: tuple) -> dict:
    return {"instruction": instruction, "completions": [completion("A " + instruction, *a), completion("B", *b)]}


def hs_rows(prompt: str, a: tuple, b: tuple) -> list[dict]:
    return [helpsteer(prompt, "good " + prompt, *a), helpsteer(prompt, "bad " + prompt, *b)]


PKU_A = [pku(f"Question {i}?", f"Unsafe {i}.", f"Safe {i}.") for i in range(6)]
PKU_A.append(pku("Question 0?", "Another unsafe answer.", "Safe 0."))  # same prompt as the first
PKU_B = [pku("Question 3?", "Unsafe 3.", "Safe 3."), pku("Question 9?", "Unsafe 9.", "Safe 9."), b"{broken"]
UF = (
    [uf_row(f"All better {i}", ("5", "5", "5", "5"), ("1", "1", "1", "1")) for i in range(4)]
    + [uf_row(f"More helpful {i}", ("5", "3", "3", "3"), ("1", "3", "3", "3")) for i in range(2)]
    + [uf_row("Helpful, less honest", ("5", "1", "3", "3"), ("1", "3", "3", "3"))]
    + [uf_row("Honest, less helpful", ("1", "5", "3", "3"), ("3", "1", "3", "3"))]  # no consistent peer
)
HS2 = (
    [r for i in range(3) for r in hs_rows(f"H{i}", (4, 4, 4, 4, 2), (1, 1, 1, 1, 2))]
    + hs_rows("H-odd", (4, 0, 4, 4, 2), (1, 4, 1, 1, 2))  # less correct: contradicts every other pair
    + [helpsteer("H0", "middling", 2, 2, 2, 2, 2)]  # not selected
)
MIN_ITEMS, MAX_ITEMS = 2, 4
ALIGNMENT = sorted({d for source in SOURCES for d in source_dimensions(source)})  # forum counted on these


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("universal")
    inputs = run / "inputs"
    inputs.mkdir()
    sources = [
        UniversalSource(source="pku_saferlhf", path=write_jsonl(inputs / "pku_a.jsonl", PKU_A)),
        UniversalSource(source="ultrafeedback", path=write_parquet(inputs / "uf.parquet", UF)),
        UniversalSource(source="helpsteer2", path=write_parquet(inputs / "hs2.parquet", HS2)),
        UniversalSource(source="pku_saferlhf", path=write_jsonl(inputs / "pku_b.jsonl", PKU_B)),
    ]
    config = DEMO.build.universal.model_copy(
        update={"sources": sources, "min_items": MIN_ITEMS, "max_items": MAX_ITEMS}
    )
    table = synthetic.planted_annotations(synthetic.SyntheticConfig(n_threads=40, n_users=16, seed=5))
    (run / "annotate" / "data").mkdir(parents=True)
    pq.write_table(table, run / "annotate" / "data" / "part-0.parquet")
    run_pairs(DEMO.build.pairs, run / "annotate", run / "pairs")
    run_personas(
        PersonaConfig(items=8, pool=DEMO.build.personas.pool), run / "annotate", run / "pairs", run / "personas"
    )
    figures = run_universal(config, SPACE, run / "universal")
    figures_assemble = run_assemble(
        AssembleConfig(test_per_cell=2),
        run / "annotate",
        run / "pairs",
        run / "personas",
        None,
        run / "dataset",
        run / "universal",
    )
    return run, config, figures, figures_assemble


def test_read_figures_and_rejects(built):
    run, _, figures, _ = built
    sources = figures["sources"]
    assert sources["pku_saferlhf"]["files"] == 2
    assert sources["pku_saferlhf"]["pairs"] == 8  # 7 from the first file, 1 new from the second
    assert sources["pku_saferlhf"]["rejected_by_reason"] == {"duplicate_pair": 1, "malformed_json": 1}
    assert sources["ultrafeedback"] == {**sources["ultrafeedback"], "pairs": 8, "too_few_peers": 1}
    assert sources["helpsteer2"]["rejected_by_reason"] == {"not_selected": 1}
    assert sources["helpsteer2"]["too_few_peers"] == 1
    rejected = pq.read_table(run / "universal" / "_rejected")
    assert set(rejected["stage"].to_pylist()) == {"universal"}
    assert rejected.num_rows == figures["rejected"] == sum(s["rejected_rows"] for s in sources.values()) + 2


def test_every_universal_pair_is_in_train_once_or_rejected(built):
    run, _, figures, assembled = built
    pairs = pq.read_table(run / "universal" / "pairs")
    assert pairs.num_rows == figures["pairs"] == 8 + 8 + 4
    train = pq.read_table(run / "dataset" / "train")
    test = pq.read_table(run / "dataset" / "test")
    assert test.num_rows > 0 and not any(map(is_universal, test["example_id"].to_pylist()))
    in_train = Counter(i for i in train["example_id"].to_pylist() if is_universal(i))
    assert set(in_train.values()) == {1}
    too_few = pq.read_table(run / "universal" / "_rejected" / "universal-personas.parquet")
    assert set(too_few["reason"].to_pylist()) == {"too_few_peers"}
    rejected = {d.split(":")[0] for d in too_few["detail"].to_pylist()}
    assembly_rejected = pq.read_table(run / "dataset" / "_rejected")
    rejected |= {d for d in assembly_rejected["detail"].to_pylist() if is_universal(d)}
    assert set(in_train).isdisjoint(rejected)
    assert set(in_train) | rejected == set(pairs["pair_id"].to_pylist())
    assert len(rejected) == 2  # the two pairs without a consistent peer; assembly keeps the rest
    assert assembled["train"] + assembled["test"] + assembled["rejected"] == assembled["pairs_in"]


def test_personas_are_peers_in_range_and_joined_with_their_text(built):
    run, _, _, _ = built
    pairs = {p["pair_id"]: p for p in pq.read_table(run / "universal" / "pairs").to_pylist()}
    personas = pq.read_table(run / "universal" / "personas").to_pylist()
    train = {r["example_id"]: r for r in pq.read_table(run / "dataset" / "train").to_pylist()}
    assert len(personas) == 18
    for persona in personas:
        pair = pairs[persona["pair_id"]]
        items = persona["pair_feedback"]
        assert MIN_ITEMS <= len(items) <= MAX_ITEMS and persona["ugc"] == []
        for item in items:
            peer = pairs[item["pair_id"]]
            assert peer["source"] == pair["source"] and peer["pair_id"] != pair["pair_id"]
            assert peer["thread_id"] != pair["thread_id"]
            assert item["direction"] == peer["direction"]
            assert consistent(np.array(item["direction"]), np.array(pair["direction"]))[0]
        example = train[persona["pair_id"]]
        assert example[schema.UGC] == [] and example[schema.DEMOGRAPHIC] is None
        assert example[schema.DIRECTION] == pair["direction"]
        assert [(i["prompt"], i["chosen"], i["rejected"]) for i in example[schema.PAIR]] == [
            (pairs[i["pair_id"]]["prompt"], pairs[i["pair_id"]]["chosen"], pairs[i["pair_id"]]["rejected"])
            for i in items
        ]


def test_rerun_draws_the_same_personas(built, tmp_path):
    run, config, _, _ = built
    again = run_universal(config, SPACE, tmp_path / "universal")
    assert again["with_persona"] == 18
    before = pq.read_table(run / "universal" / "personas").sort_by("pair_id")
    assert pq.read_table(tmp_path / "universal" / "personas").sort_by("pair_id").equals(before)


def test_table1_counts_equal_a_direct_count(built):
    run, _, _, _ = built
    counted = split_sources(run / "dataset" / "train")
    train = pq.read_table(run / "dataset" / "train", columns=["example_id", schema.DIRECTION]).to_pylist()
    direct = Counter()
    for row in train:
        source = next((s for s in SOURCES if row["example_id"].startswith(s + "-")), FORUM)
        direct[source, "examples"] += 1
        for d, value in enumerate(row[schema.DIRECTION]):
            direct[source, SPACE[d].name] += value != 0.5
    assert set(counted) == {FORUM, *SOURCES}
    for source, numbers in counted.items():
        assert numbers["examples"] == direct[source, "examples"] > 0
        rated = source_dimensions(source) if source != FORUM else ALIGNMENT
        assert numbers["non_neutral"] == {SPACE[d].name: direct[source, SPACE[d].name] for d in rated}
    assert counted["pku_saferlhf"]["examples"] == 8
    uf = counted["ultrafeedback"]["non_neutral"]
    assert (uf[concern("helpfulness")], uf[concern("honesty")], uf[concern("truthfulness")]) == (7, 5, 4)
    # The pure count gives the same table from the rows in one piece.
    whole = pq.read_table(run / "dataset" / "train", columns=["example_id", schema.DIRECTION])
    assert table1(source_counts(whole)) == counted
