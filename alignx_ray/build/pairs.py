"""Preference pairs (paper §4.1 steps 2–3, Algorithm 1 lines 4–8).

A response's intensity embedding is its one-hot levels, concatenated (D x L). Within each
thread the embeddings are clustered with K-means (K = 3); a pair takes y_w and y_l uniformly
from two distinct clusters, and its direction compares their levels per dimension
(1 where y_w is stronger, 0 where weaker, 0.5 where equal). Every random choice is seeded
from the thread id, so a resumed run draws the same pairs as an uninterrupted one.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.aggregate import Count, Sum

from alignx_ray.common.config import Section
from alignx_ray.common.raydata import shuffle_partitions, write_parquet, write_rejected
from alignx_ray.common.schema import LABELLED_COLUMNS, PAIRS_SCHEMA, list_matrix, only_labelled
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import compare_levels, intensity_embedding


class PairsConfig(Section):
    """How pairs are drawn.

    clusters: K of the per-thread K-means (the paper's 3).
    pairs_per_thread: pairs drawn per thread (distinct response pairs; fewer when the thread
        has fewer cross-cluster pairs).
    kmeans_iterations: Lloyd iterations of the K-means.
    seed: mixed with each thread id into that thread's random stream.
    """

    clusters: int = 3
    pairs_per_thread: int = 1
    kmeans_iterations: int = 25
    seed: int = 0


def cluster_thread(levels: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Cluster label per response of one thread.

    With at most k distinct level vectors each distinct vector is its own cluster (K-means
    could not separate more, and this keeps tiny threads deterministic); otherwise FAISS
    K-means over the embeddings, seeded.
    """
    import faiss

    rows = np.ascontiguousarray(levels, dtype=np.uint8).view(np.dtype((np.void, levels.shape[1])))[:, 0]
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)  # distinct level vectors
    if len(first) <= k:
        order = np.argsort(np.argsort(first))  # number clusters by first appearance
        return order[inverse]
    x = intensity_embedding(levels)
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 20,
        verbose=False,
    )
    kmeans.train(x)
    return kmeans.index.search(x, 1)[1].reshape(-1)


def draw_pairs(labels: np.ndarray, n_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to `n_pairs` distinct (chosen, rejected) index pairs: two distinct clusters drawn
    uniformly, then one response uniformly from each (Algorithm 1, lines 6–8)."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return []
    members = {c: np.flatnonzero(labels == c) for c in clusters}
    available = sum(len(members[a]) * len(members[b]) for a in clusters for b in clusters if a < b)
    pairs: list[tuple[int, int]] = []
    seen: set[frozenset] = set()
    while len(pairs) < min(n_pairs, available):
        won, lost = rng.choice(clusters, 2, replace=False)
        chosen, rejected = int(rng.choice(members[won])), int(rng.choice(members[lost]))
        if frozenset((chosen, rejected)) not in seen:
            seen.add(frozenset((chosen, rejected)))
            pairs.append((chosen, rejected))
    return pairs


def thread_pairs(thread: pa.Table, config: PairsConfig) -> tuple[list[dict], list[dict]]:
    """Pairs of one thread's annotated responses -> (pair rows, rejected rows).

    `thread` holds `thread_id, response_id, post, response, levels` of one thread, rows
    sorted by response_id, so the draw does not depend on the order rows arrived in. Only the
    drawn responses' text is read out of the table.
    """
    thread = thread.sort_by("response_id")
    thread_id = thread["thread_id"][0].as_py()
    levels = list_matrix(thread["levels"], np.uint8)
    rng = seeded_rng("pairs", config.seed, thread_id)
    labels = cluster_thread(levels, config.clusters, int(rng.integers(1 << 31)), config.kmeans_iterations)
    drawn = draw_pairs(labels, config.pairs_per_thread, rng)
    if not drawn:
        return [], [
            {
                "stage": "pairs",
                "reason": "one_cluster",
                "detail": f"{thread.num_rows} responses, all with the same levels",
                "thread_id": thread_id,
            }
        ]
    ids = thread["response_id"].to_pylist()
    sources = thread["source"].to_pylist() if "source" in thread.column_names else [None] * thread.num_rows
    out, rejected = [], []
    for chosen, lost in drawn:
        direction = compare_levels(levels[chosen], levels[lost]).tolist()
        pair_id = f"{ids[chosen]}>{ids[lost]}"
        if all(d == 0.5 for d in direction):
            rejected.append(
                {"stage": "pairs", "reason": "no_non_neutral_dimension", "detail": pair_id, "thread_id": thread_id}
            )
            continue
        out.append(
            {
                "pair_id": pair_id,
                "thread_id": thread_id,
                "prompt": thread["post"][chosen].as_py(),
                "chosen_id": ids[chosen],
                "rejected_id": ids[lost],
                "chosen": thread["response"][chosen].as_py(),
                "rejected": thread["response"][lost].as_py(),
                "chosen_levels": levels[chosen].tolist(),
                "rejected_levels": levels[lost].tolist(),
                "direction": direction,
                "source": sources[chosen] or "threads",
            }
        )
    return out, rejected


# What the per-thread draw writes: pairs, or a reason per rejected draw (then `reject` is set);
# `thread_responses` is the thread's response count on its first row only, so the figures
# come from sums over this table.
STAGING_SCHEMA = PAIRS_SCHEMA.append(pa.field("reject", pa.string())).append(pa.field("thread_responses", pa.int64()))


def pairs_of_thread(thread: pa.Table, config: PairsConfig) -> pa.Table:
    """`thread_pairs` of one thread as rows of STAGING_SCHEMA (at least one per thread)."""
    pairs, rejected = thread_pairs(thread, config)
    rows = [{**p, "reject": None} for p in pairs]
    rows += [{"thread_id": r["thread_id"], "reject": f"{r['reason']}: {r['detail']}"} for r in rejected]
    rows[0]["thread_responses"] = thread.num_rows
    return pa.Table.from_pylist(rows, STAGING_SCHEMA)


def run_pairs(config: PairsConfig, annotate_dir: Path, out_dir: Path) -> dict:
    """read_parquet(labelled responses) -> groupby(thread_id).map_groups(draw) -> write_parquet,
    then the pairs and the rejects split from that output. The driver holds counts and the
    rejected threads' reasons only."""
    started = time.time()
    staging, data = out_dir / "_staging", out_dir / "data"
    for folder in (staging, data):  # a killed run's partial output must not be appended to
        shutil.rmtree(folder, ignore_errors=True)
    responses = ray.data.read_parquet(str((annotate_dir / "data").resolve())).select_columns(LABELLED_COLUMNS)
    labelled = responses.map_batches(only_labelled, batch_format="pyarrow")
    drawn = labelled.groupby("thread_id", num_partitions=shuffle_partitions(annotate_dir / "data")).map_groups(
        pairs_of_thread, fn_args=(config,), batch_format="pyarrow"
    )
    write_parquet(drawn, staging)
    if not any(staging.glob("*.parquet")):
        raise ValueError(f"no labelled responses in {annotate_dir / 'data'}")
    staged = ray.data.read_parquet(str(staging.resolve()))
    write_parquet(staged.map_batches(_good_pairs, batch_format="pyarrow"), data)
    counts = staged.select_columns(["thread_responses", "reject"]).aggregate(
        Count(alias_name="rows"),
        Count("thread_responses", ignore_nulls=True, alias_name="threads"),
        Sum("thread_responses", alias_name="responses"),
        Count("reject", ignore_nulls=True, alias_name="rejected"),
    )
    bad = pq.read_table(staging, columns=["thread_id", "reject"], filters=pc.field("reject").is_valid())
    write_rejected(
        out_dir,
        "pairs",
        pa.table(
            {
                "reason": pc.list_element(pc.split_pattern(bad["reject"], ":", max_splits=1), 0),
                "detail": bad["reject"],
                "thread_id": bad["thread_id"],
            }
        ),
    )
    shutil.rmtree(staging)
    return {
        "responses_in": counts["responses"] or 0,
        "threads": counts["threads"],
        "pairs": counts["rows"] - counts["rejected"],
        "threads_rejected": counts["rejected"],
        "seconds": round(time.time() - started, 2),
    }


def _good_pairs(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reject"])).select(PAIRS_SCHEMA.names)
