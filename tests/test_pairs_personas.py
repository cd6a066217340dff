"""Pure cores of the dataset build: pairs, exact retrieval, personas, assembly (no Ray)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from alignx_rows import example_consistent

from alignx_ray.build.assemble import (
    JOINED_SCHEMA,
    PAIR,
    PIECES_SCHEMA,
    TEXT_SCHEMA,
    VOTES,
    AssembleConfig,
    assemble_examples,
    conform,
    id_buckets,
    item_text_bytes,
    joined_rows,
    persona_items,
)
from alignx_ray.build.pairs import PairsConfig, cluster_thread, draw_pairs, thread_pairs
from alignx_ray.build.persona_pool import Pool, shard_pools
from alignx_ray.build.personas import (
    PersonaConfig,
    consistent,
    persona_rows,
    persona_stage,
    vote,
)
from alignx_ray.build.test_draw import persona_agreement, select_test
from alignx_ray.common import schema
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import intensity_embedding
from alignx_ray.engines.retrieval import LevelIndex, min_equal_dims, same_neighbours

D = 90


def levels_with(**set_dims) -> list[int]:
    lv = [2] * D
    for key, value in set_dims.items():
        lv[int(key[1:])] = value
    return lv


def thread_table(thread_id: str, levels: list[list[int]], post="post") -> pa.Table:
    n = len(levels)
    return pa.table(
        {
            "thread_id": [thread_id] * n,
            "response_id": [f"{thread_id}-r{i}" for i in range(n)],
            "post": [post] * n,
            "response": [f"text {thread_id} {i}" for i in range(n)],
            "source": ["threads"] * n,
            "levels": pa.array(levels, pa.list_(pa.uint8())),
        }
    )


def test_intensity_embedding_dot_counts_equal_dimensions():
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 4, (2, D))
    codes = intensity_embedding(np.stack([a, b]))
    assert codes.shape == (2, 270) and (codes.reshape(2, D, 3).sum(-1) == 1).all()
    assert codes[0] @ codes[1] == (a == b).sum()


def test_min_equal_dims_is_strict_threshold():
    assert min_equal_dims(0.6, 90) == 55  # cosine 54/90 = 0.6 is not > 0.6
    assert min_equal_dims(0.5, 90) == 46
    assert min_equal_dims(0.61, 90) == 55  # 54.9 -> 55


@pytest.mark.parametrize("n_dims", [D, 7])  # an odd D pads the last fast-scan code
def test_exact_indexes_agree_with_brute_force(n_dims):
    rng = np.random.default_rng(1)
    base = rng.choice([1, 2, 3], size=(500, n_dims), p=[0.1, 0.8, 0.1]).astype(np.uint8)
    queries = base[:40].copy()
    queries[:, :5] = 1
    brute = (queries[:, None, :] == base[None]).sum(-1)
    answers = {kind: LevelIndex(base, kind).search(queries, 25) for kind in ("fastscan", "binary", "flat_ip")}
    for kind, answer in answers.items():
        assert np.array_equal(answer[0], -np.sort(-brute, axis=1)[:, :25]), kind
        assert same_neighbours(answer, answers["flat_ip"]), kind
        assert (np.take_along_axis(brute, answer[1], 1) == answer[0]).all(), kind
        empty = LevelIndex(base[:0], kind).search(queries, 25)  # a shard of a small pool may be empty
        assert empty[0].shape == empty[1].shape == (40, 0), kind
    scores, ids = answers["fastscan"]
    assert not same_neighbours(answers["binary"], (scores - 1, ids))
    with pytest.raises(ValueError, match="unknown index kind"):
        LevelIndex(base, "hnsw")
    with pytest.raises(ValueError, match="at most 254 dimensions"):
        LevelIndex(np.ones((2, 255), np.uint8), "fastscan")


def test_cluster_thread_small_threads_are_deterministic_groups():
    lv = np.array([levels_with(d0=3), levels_with(d0=1), levels_with(d0=3), levels_with(d0=3)], np.uint8)
    assert cluster_thread(lv, 3, seed=0).tolist() == [0, 1, 0, 0]
    assert cluster_thread(lv[[0, 2]], 3, seed=0).tolist() == [0, 0]


def test_cluster_thread_kmeans_separates_clear_groups():
    group_a = [levels_with(d0=3, d1=3, d2=3, d3=3, d5=i % 3 + 1) for i in range(4)]
    group_b = [levels_with(d0=1, d1=1, d2=1, d3=1, d6=i % 3 + 1) for i in range(4)]
    group_c = [levels_with(d10=3, d11=3, d12=3, d13=3, d7=i % 3 + 1) for i in range(4)]
    labels = cluster_thread(np.array(group_a + group_b + group_c, np.uint8), 3, seed=5)
    assert len(set(labels[:4])) == len(set(labels[4:8])) == len(set(labels[8:])) == 1
    assert len(set(labels)) == 3


def test_draw_pairs_cross_clusters_and_distinct():
    labels = np.array([0, 0, 1, 2, 2])
    pairs = draw_pairs(labels, 100, seeded_rng("t"))
    assert len(pairs) == 2 * 1 + 2 * 2 + 1 * 2  # every cross-cluster pair once
    assert all(labels[a] != labels[b] for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    assert draw_pairs(np.zeros(4, int), 3, seeded_rng("t")) == []


def test_thread_pairs_direction_and_order_independence():
    thread = thread_table("t1", [levels_with(d0=3, d4=1), levels_with(d0=1, d4=1), levels_with(d0=2, d4=3)])
    config = PairsConfig(pairs_per_thread=3)
    pairs, rejected = thread_pairs(thread, config)
    assert not rejected and len(pairs) == 3
    for p in pairs:
        w, lose = np.array(p["chosen_levels"]), np.array(p["rejected_levels"])
        expected = np.where(w > lose, 1.0, np.where(w < lose, 0.0, 0.5))
        assert p["direction"] == expected.tolist()
    shuffled, _ = thread_pairs(thread.take([2, 0, 1]), config)
    assert shuffled == pairs


def test_thread_with_one_distinct_annotation_is_rejected_with_reason():
    pairs, rejected = thread_pairs(thread_table("t2", [levels_with(d0=3)] * 3), PairsConfig())
    assert pairs == [] and rejected[0]["reason"] == "one_cluster" and rejected[0]["thread_id"] == "t2"


def test_consistency_criterion():
    direction = np.full(D, 0.5)
    direction[[0, 1]] = [1.0, 0.0]
    items = np.full((4, D), 0.5)
    items[0, 0] = 1.0  # matches on 0
    items[1, [0, 1]] = [1.0, 1.0]  # matches 0, contradicts 1
    items[2, 5] = 1.0  # only where P is neutral: no match
    items[3, [1, 7]] = [0.0, 0.0]  # matches 1
    assert consistent(items, direction).tolist() == [True, False, False, True]


def test_vote_abstains_on_neutral_and_ties():
    items = np.array([[1.0, 0.0, 0.5, 1.0], [1.0, 0.5, 0.5, 0.0], [0.5, 0.0, 0.5, 0.5]])
    assert vote(items).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_example_consistency_needs_one_common_dimension():
    """The vectorised filter equals the per-example rule, a missing persona not voting."""
    p = [1.0, 0.0, 0.5]
    rows = [
        {"direction": p, "ugc_direction": [1.0, 0.5, 0.5], "pair_direction": [1.0, 0.0, 0.5]},
        {"direction": p, "ugc_direction": [1.0, 0.5, 0.5], "pair_direction": [0.5, 0.0, 0.5]},
        {"direction": [0.5] * 3},
        {"direction": p},
        {"direction": p, "ugc_direction": [1.0, 0.0, 0.5], "demo_direction": [0.5, 0.0, 0.5]},
    ]
    agree = persona_agreement(pa.Table.from_pylist(rows, JOINED_SCHEMA))
    assert agree.any(axis=1).tolist() == [True, False, False, True, True]
    assert agree[4].tolist() == [False, True, False]
    for row, kept in zip(rows, agree.any(axis=1)):
        votes = [np.array(row[k]) for k in ("ugc_direction", "pair_direction", "demo_direction") if k in row]
        assert example_consistent(np.array(row["direction"]), votes) == kept


@pytest.fixture(scope="module")
def corpus():
    """Threads whose responses carry one of four trait profiles, so similar ones exist across threads."""
    rng = np.random.default_rng(3)
    profiles = [levels_with(d0=3, d1=3), levels_with(d0=1, d2=3), levels_with(d3=3, d1=1), levels_with(d4=1)]
    tables, pairs = [], []
    for t in range(30):
        lv = [profiles[i] for i in rng.permutation(4)[:3]]
        tables.append(thread_table(f"t{t:02d}", lv, post=f"post {t}"))
        pairs += thread_pairs(tables[-1], PairsConfig(pairs_per_thread=2))[0]
    from alignx_ray.common.schema import PAIRS_SCHEMA

    return pa.concat_tables(tables), pa.Table.from_pylist(pairs, PAIRS_SCHEMA)


def test_personas_respect_threshold_thread_and_consistency(corpus):
    responses, pairs = corpus
    pool_r, pool_p = Pool.of_responses(responses), Pool.of_pairs(pairs)
    config = PersonaConfig(items=5, candidates=200)
    out = persona_rows(pairs, pool_r, pool_p, (pool_r.index("binary"), pool_p.index("binary")), config).to_pylist()
    levels = dict(zip(responses["response_id"].to_pylist(), responses["levels"].to_pylist()))
    need = min_equal_dims(0.6, D)
    for pair, persona in zip(pairs.to_pylist(), out):
        direction = np.array(pair["direction"])
        assert 0 < len(persona["ugc"]) <= 5 and 0 < len(persona["pair_feedback"]) <= 5
        threads = [i["response_id"].rsplit("-", 1)[0] for i in persona["ugc"]]
        assert pair["thread_id"] not in threads and len(set(threads)) == len(threads)
        for item in persona["ugc"]:
            assert (np.array(levels[item["response_id"]]) == np.array(pair["chosen_levels"])).sum() >= need
            assert consistent(np.array(item["direction"]), direction)[0]
        for item in persona["pair_feedback"]:
            assert not item["pair_id"].startswith(pair["thread_id"] + "-")
            assert consistent(np.array(item["direction"]), direction)[0]
        assert persona["ugc_direction"] == vote(np.array([i["direction"] for i in persona["ugc"]])).tolist()
    for kind in ("flat_ip", "fastscan"):  # every exact index gives the same personas
        other = persona_rows(pairs, pool_r, pool_p, (pool_r.index(kind), pool_p.index(kind)), config)
        assert other.to_pylist() == out, kind
    # Fewer candidates than rows: the tie at the cut is dropped, so the indexes still agree.
    few = PersonaConfig(items=5, candidates=40)
    cut = [
        persona_rows(pairs, pool_r, pool_p, (pool_r.index(kind), pool_p.index(kind)), few).to_pylist()
        for kind in ("flat_ip", "fastscan", "binary")
    ]
    assert cut[0] == cut[1] == cut[2] and cut[0] != out


def sharded_personas(pairs: pa.Table, pools: tuple[Pool, Pool], config: PersonaConfig, shard_rows: int, kind: str):
    """The Ray job's chain of shard stages, run one after another; each stage gets the rows in
    batches cut differently, as Ray Data may re-batch between stages (an empty one included)."""
    shards = shard_pools(*pools, shard_rows)
    batch = pairs
    for s, shard in enumerate(shards):
        indexes = tuple(pool.index(kind) for pool in shard)
        bounds = [0, 0, *range(7 + 5 * s, batch.num_rows, 23), batch.num_rows]
        pieces = [batch.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        last = s == len(shards) - 1
        batch = pa.concat_tables([persona_stage(piece, shard, indexes, config, s > 0, last) for piece in pieces])
    return batch, len(shards)


@pytest.mark.parametrize("kind", ["fastscan", "binary"])
def test_sharded_personas_equal_the_whole_pools(corpus, kind):
    """Personas from pools split into 1 to 13 shards (threads split across shards at 23 and 7
    rows) equal those of the whole pools, also when fewer candidates than a shard holds put
    the cut inside each shard."""
    responses, pairs = corpus
    pools = Pool.of_responses(responses), Pool.of_pairs(pairs)
    assert [len(s.ids) for s, _ in shard_pools(*pools, 23)] == [22, 23, 22, 23]
    for config in (PersonaConfig(items=5, candidates=200), PersonaConfig(items=5, candidates=10)):
        whole = persona_rows(pairs, *pools, tuple(pool.index(kind) for pool in pools), config)
        for shard_rows, count in ((90, 1), (45, 2), (30, 3), (23, 4), (7, 13)):
            sharded, shards = sharded_personas(pairs, pools, config, shard_rows, kind)
            assert shards == count and sharded.equals(whole), (config.candidates, shard_rows)


def joined(corpus, demo=None):
    responses, pairs = corpus
    pool_r, pool_p = Pool.of_responses(responses), Pool.of_pairs(pairs)
    personas = persona_rows(
        pairs, pool_r, pool_p, (pool_r.index("binary"), pool_p.index("binary")), PersonaConfig(items=6)
    )
    # The text that assembly joins to each item by id.
    response_text = {r["response_id"]: r for r in responses.to_pylist()}
    pair_text = {p["pair_id"]: p for p in pairs.to_pylist()}
    rows = []
    for p, q in zip(pairs.to_pylist(), personas.to_pylist()):
        q["ugc"] = [
            {
                **u,
                "prompt": response_text[u["response_id"]]["post"],
                "comment": response_text[u["response_id"]]["response"],
            }
            for u in q["ugc"]
        ]
        q["pair_feedback"] = [{**pair_text[f["pair_id"]], **f} for f in q["pair_feedback"]]
        rows.append({**p, **q, "demo_text": None, "demo_direction": demo})
    return rows


def joined_table(rows: list[dict]) -> pa.Table:
    """Joined rows as the co-group writes them."""
    sizes = [{"ugc_items": len(r["ugc"]), "pair_items": len(r["pair_feedback"])} for r in rows]
    return pa.Table.from_pylist([{**r, **n} for r, n in zip(rows, sizes)], JOINED_SCHEMA)


def test_pieces_of_a_pair_gather_into_its_joined_row(corpus):
    """Assembly's pure steps around its two shuffles: items flattened with their position, the
    text joined by id (here by a lookup, as Ray Data's join does), then every piece of a pair
    (items, the pair, the personas' votes) gathered into one row, items in persona order."""
    responses, pairs = corpus
    expected = {r["pair_id"]: r for r in joined(corpus)}
    pool_r, pool_p = Pool.of_responses(responses), Pool.of_pairs(pairs)
    personas = persona_rows(
        pairs, pool_r, pool_p, (pool_r.index("binary"), pool_p.index("binary")), PersonaConfig(items=6)
    )
    items = persona_items(personas)
    texts = pa.concat_tables(
        [
            conform(
                responses.select(["response_id", "post", "response"]).rename_columns(["item_id", "prompt", "comment"]),
                TEXT_SCHEMA,
            ),
            conform(
                pairs.select(["pair_id", "prompt", "chosen", "rejected"]).rename_columns(
                    ["item_id", "prompt", "chosen", "rejected"]
                ),
                TEXT_SCHEMA,
            ),
        ]
    )
    found = pc.index_in(items["item_id"], value_set=texts["item_id"])
    for name in ("prompt", "comment", "chosen", "rejected"):
        items = items.append_column(name, texts[name].take(found))
    pieces = pa.concat_tables(
        [
            conform(items, PIECES_SCHEMA),
            conform(pairs, PIECES_SCHEMA, kind=PAIR),
            conform(personas.select(["pair_id", "ugc_direction", "pair_direction"]), PIECES_SCHEMA, kind=VOTES),
        ]
    )
    pieces = pieces.take(np.random.default_rng(0).permutation(pieces.num_rows))  # a shuffle keeps no order
    # A pair whose personas are missing gives no row, as the inner join it replaces.
    alone = expected.popitem()[0]
    pieces = pieces.filter(pc.invert(pc.and_(pc.equal(pieces["pair_id"], alone), pc.equal(pieces["kind"], VOTES))))
    got = {r["pair_id"]: r for r in joined_rows(pieces).to_pylist()}
    assert set(got) == set(expected)
    for pair_id, want in expected.items():
        row = got[pair_id]
        assert row["ugc"] == want["ugc"] and row["direction"] == want["direction"]
        assert row["pair_feedback"] == [
            {k: f[k] for k in ("pair_id", "prompt", "chosen", "rejected", "direction")} for f in want["pair_feedback"]
        ]
        assert (row["ugc_items"], row["pair_items"]) == (len(want["ugc"]), len(want["pair_feedback"]))
        assert (row["ugc_direction"], row["pair_direction"]) == (want["ugc_direction"], want["pair_direction"])
        assert (row["prompt"], row["chosen"], row["thread_id"]) == (want["prompt"], want["chosen"], want["thread_id"])
        assert row["demo_text"] is None
    # Gathered a bucket at a time, the rows are the same.
    buckets = id_buckets(pieces["pair_id"], 3)
    parts = [joined_rows(pieces.filter(pa.array(buckets == b))) for b in range(3)]
    assert pa.concat_tables(parts).sort_by("pair_id").equals(joined_rows(pieces))


def test_id_buckets_are_stable_and_spread():
    ids = pa.array([f"t{i}-r0>t{i}-r1" for i in range(4000)])
    buckets = id_buckets(ids, 8)
    assert buckets.tolist() == id_buckets(ids.slice(0), 8).tolist()
    assert id_buckets(ids.slice(100, 5), 8).tolist() == buckets[100:105].tolist()  # a slice of a buffer
    assert np.bincount(buckets, minlength=8).min() > 4000 / 8 * 0.8
    assert id_buckets(pa.array([], pa.string()), 8).size == 0


def test_assemble_splits_are_balanced_disjoint_and_official(corpus):
    rows = joined(corpus)
    config = AssembleConfig(test_per_cell=2, test_items=4)
    test = select_test(joined_table(rows), config)
    assert test
    cells = {}
    for d, v in test.values():
        cells.setdefault(d, []).append(v)
    assert all(vs.count(1.0) == vs.count(0.0) <= 2 for vs in cells.values())
    test_threads = {r["thread_id"] for r in rows if r["pair_id"] in test}
    staged = assemble_examples(joined_table(rows), test, test_threads, config)
    examples = staged.filter(pc.is_null(staged["reject"])).select(schema.ALIGNX_SCHEMA.names)
    assert examples.schema == schema.ALIGNX_SCHEMA and staged.num_rows == len(rows)
    assert sorted(staged["example_id"].to_pylist()) == sorted(r["pair_id"] for r in rows)
    ex = examples.to_pylist()
    by_id = {r["pair_id"]: r for r in rows}
    train_prompts = {e["prompt"] for e in ex if e["split"] == "train"}
    assert {e["example_id"] for e in ex if e["split"] == "test"} == set(test)
    for e in ex:
        r = by_id[e["example_id"]]
        if e["split"] == "test":
            assert len(e[schema.UGC]) == len(e[schema.PAIR]) == 4
            d, v = test[e["example_id"]]
            assert e[schema.DIRECTION][d] == v and e["prompt"] not in train_prompts
            # The kept items are a seeded sample of the persona's, in persona order.
            prompts = [u["prompt"] for u in r["ugc"]]
            kept = [prompts.index(u["prompt"]) for u in e[schema.UGC]]
            assert kept == sorted(kept)
        else:
            assert e[schema.UGC] == [
                {"prompt": u["prompt"], "comment": u["comment"], schema.DIRECTION: u["direction"]} for u in r["ugc"]
            ]
            assert [p["chosen"] for p in e[schema.PAIR]] == [p["chosen"] for p in r["pair_feedback"]]
        assert example_consistent(
            np.array(r["direction"]), [np.array(r["ugc_direction"]), np.array(r["pair_direction"])]
        )
    for reject in staged.filter(pc.is_valid(staged["reject"])).to_pylist():
        r = by_id[reject["example_id"]]
        if reject["reject"] == "thread_held_out_for_test":
            assert r["thread_id"] in test_threads
        else:
            assert reject["reject"] == "personas_inconsistent_with_pair"
            assert not example_consistent(
                np.array(r["direction"]), [np.array(r["ugc_direction"]), np.array(r["pair_direction"])]
            )
    assert schema.to_official(examples).num_rows == examples.num_rows
    # A cap stops adding dimensions once reached: fewer examples, cells still balanced.
    capped = select_test(joined_table(rows), AssembleConfig(test_per_cell=2, test_items=4, test_max=2))
    dims = sorted({d for d, _ in capped.values()})
    assert 2 <= len(capped) < len(test) and dims == sorted({d for d, _ in test.values()})[: len(dims)]
    for d in dims:
        directions = [v for dim, v in capped.values() if dim == d]
        assert directions.count(1.0) == directions.count(0.0)


def test_inconsistent_demographic_rejects_the_example(corpus):
    rows = joined(corpus, demo=[0.5] * D)  # a P_DEMO that agrees nowhere
    staged = assemble_examples(joined_table(rows), {}, set(), AssembleConfig())
    assert set(staged["reject"].to_pylist()) == {"personas_inconsistent_with_pair"}


def test_official_reader_checks_dimensions():
    row = {
        schema.PROMPT: "p",
        schema.CHOSEN: "a",
        schema.REJECTED: "b",
        schema.DIRECTION: [0.5] * 89,
        schema.DEMOGRAPHIC: "",
        schema.UGC: [],
        schema.PAIR: [],
    }
    with pytest.raises(ValueError, match="row 0"):
        schema.to_official(pa.Table.from_pylist([row]))
    row[schema.DIRECTION] = [0.5] * 90
    table = schema.to_official(pa.Table.from_pylist([row]))
    assert table["example_id"].to_pylist() == ["alignx-0"] and table.schema == schema.ALIGNX_SCHEMA


def test_item_text_estimate_follows_the_joined_text(corpus, tmp_path):
    """The co-group is sized by the text its persona items gain in the join, estimated from
    footers alone; an estimate far below it packs the shuffle into too few partitions."""
    responses, pairs = corpus
    pool_r, pool_p = Pool.of_responses(responses), Pool.of_pairs(pairs)
    personas = persona_rows(
        pairs, pool_r, pool_p, (pool_r.index("binary"), pool_p.index("binary")), PersonaConfig(items=6)
    )
    folders = {}
    for name, table in {"responses": responses, "pairs": pairs, "personas": personas}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        half = table.num_rows // 2  # several files, summed
        pq.write_table(table.slice(0, half), folders[name] / "0.parquet")
        pq.write_table(table.slice(half), folders[name] / "1.parquet")
    rows = joined(corpus)
    text = sum(
        sum(len(u["prompt"]) + len(u["comment"]) for u in r["ugc"])
        + sum(len(f["prompt"]) + len(f["chosen"]) + len(f["rejected"]) for f in r["pair_feedback"])
        for r in rows
    )
    estimate = item_text_bytes([folders["pairs"]], [folders["personas"]], folders["responses"])
    assert text <= estimate <= 2 * text
