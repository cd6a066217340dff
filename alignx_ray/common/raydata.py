"""What every Ray stage shares: joining the cluster, the resumable actor-pool map, rejects.

An actor stage maps a pool of stateful actors (one engine or index each) over a parquet
table, checkpointed by a stable id column, so a re-run skips the rows it had written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignx_ray.common.config import PoolConfig, RayConfig
from alignx_ray.common.schema import REJECTED_SCHEMA

logger = logging.getLogger(__name__)

# Engines in actors run single-process on CPU; these keep vLLM from forking its own workers.
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
# What a local instance started by `init_ray` holds: nothing can join it, so a request above
# it (the production defaults ask for GPUs and 4-8 CPUs per actor) would wait forever.
_local_resources: dict[str, float] | None = None


def init_ray(config: RayConfig):
    """Join the cluster of `ray job submit` (RAY_ADDRESS), `config.address`, or start a local one."""
    import ray
    import ray.data

    if ray.is_initialized():
        return ray
    env = {"env_vars": WORKER_ENV}
    address = config.address or os.environ.get("RAY_ADDRESS")
    global _local_resources
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=config.num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False)
        _local_resources = ray.cluster_resources()
        # Ray Data's V2 Parquet reader starts 32 footer-reading actors per read (sized for an
        # object store's latency); on a local instance each is a new Python process, and a
        # co-group of five reads started 160 of them, which stalled a 2-core machine for
        # minutes. The V1 reader reads our few footers in the driver and starts no actor.
        ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray


def fit_local(num_cpus: float, num_gpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) a task or actor asks for: as configured on a cluster (which may add nodes
    to place it), capped on a local instance (to which nothing is ever added) to its GPUs and
    half its CPUs, the rest left to the reads and writes that Ray Data runs beside the actors,
    so the production defaults run on a laptop, on its CPUs, instead of waiting forever."""
    if _local_resources is None:
        return num_cpus, num_gpus
    cpus = min(num_cpus, max(1, _local_resources.get("CPU", 2) // 2))
    gpus = min(num_gpus, _local_resources.get("GPU", 0))
    if (cpus, gpus) != (num_cpus, num_gpus):
        logger.warning(
            "local Ray instance: %s CPU(s) and %s GPU(s) per worker instead of %s and %s",
            cpus,
            gpus,
            num_cpus,
            num_gpus,
        )
    return cpus, gpus


def footer_columns(*folders: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(rows, {leaf column path: (values, uncompressed bytes)}) of the parquet files under
    these folders, summed from their footers: the driver reads no rows."""
    rows, columns = 0, {}
    for f in (f for folder in folders for f in sorted(folder.rglob("*.parquet"))):
        meta = pq.read_metadata(f)
        rows += meta.num_rows
        for group in (meta.row_group(i) for i in range(meta.num_row_groups)):
            for chunk in (group.column(j) for j in range(group.num_columns)):
                values, size = columns.get(chunk.path_in_schema, (0, 0))
                columns[chunk.path_in_schema] = (values + chunk.num_values, size + chunk.total_uncompressed_size)
    return rows, columns


def shuffle_partitions(*folders: Path, size: int = 0, partition_bytes: int = 256 * 2**20) -> int:
    """Partitions of a hash shuffle (a join or groupby) over these parquet folders (plus `size`
    bytes of other input): enough that each holds about `partition_bytes` of uncompressed data,
    so no worker's memory grows with the dataset, and at least one per two CPUs of the cluster,
    so every node works. Sizes come from the files' footers."""
    import ray

    size += sum(b for _, b in footer_columns(*folders)[1].values())
    cpus = ray.cluster_resources().get("CPU", 2) if ray.is_initialized() else os.cpu_count() or 2
    return max(1, int(cpus) // 2, -(-size // partition_bytes))


def map_resumable(
    source: Path,
    output: Path,
    id_column: str,
    udf: type,
    udf_kwargs: dict,
    pool: PoolConfig,
    columns: list[str] | None = None,
    then: Sequence[tuple[type, dict]] = (),
) -> None:
    """read_parquet(source) -> map_batches(udf actors) -> write_parquet(output), checkpointed;
    `columns`: only these reach the actors (None: all); `then`: further actor stages, each
    (class, constructor kwargs) in the same pool config, through which the rows pass in turn.

    Ray Data's CheckpointConfig records the ids of written rows beside `output` and filters
    them out of the input of a re-run (two-phase commit), so a killed stage resumes.
    """
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column,
        checkpoint_path=str((output.parent / "_checkpoint").resolve()),
        delete_checkpoint_on_success=False,
    )
    num_cpus, num_gpus = fit_local(pool.num_cpus, pool.num_gpus)
    try:
        ds = ray.data.read_parquet(str(source.resolve()))
        if columns is not None:
            ds = ds.select_columns(columns)
        low, high = pool.concurrency
        for stage, kwargs in [(udf, udf_kwargs), *then]:
            ds = ds.map_batches(
                stage,
                fn_constructor_kwargs=kwargs,
                batch_size=pool.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
            )
        ds.write_parquet(str(output.resolve()))
    finally:
        ctx.checkpoint_config = None


def write_parquet(ds, folder: Path, rows_per_group: int = 4096) -> None:
    """`ds` as parquet files in `folder`, in row groups of `rows_per_group` rows. Ray Data
    writes each block as its own row group, and a groupby's UDF returns a block per group: the
    pairs of 18k threads were 18k one-row groups, whose footers (450 KB a file) every reader
    then parsed once per row group, the driver included."""
    ds.write_parquet(str(folder.resolve()), row_group_size=rows_per_group)


def claim_workdir(work: Path, key: str) -> bool:
    """Mark `work` as begun under `key`; True when it already was (its partial work resumes).

    Partial work begun under another key is wiped: it must never be resumed into this one.
    """
    stamp = work / "_started.json"
    resumed = stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == key
    if stamp.exists() and not resumed:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": key}))
    return resumed


def as_rejected(rows: pa.Table, stage: str) -> pa.Table:
    """`rows` (some of `REJECTED_SCHEMA`'s columns, the rest null) as rejected rows of `stage`."""
    columns = {
        f.name: rows[f.name] if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
        for f in REJECTED_SCHEMA
    }
    columns["stage"] = pa.array([stage] * rows.num_rows, pa.string())
    return pa.table(columns).cast(REJECTED_SCHEMA)


def write_rejected(out_dir: Path, stage: str, rows: list[dict] | pa.Table, part: str | None = None) -> int:
    """A stage's rejected rows to `out_dir/_rejected/<stage>.parquet` (`<stage>-<part>.parquet`
    for a stage that rejects in several steps or tasks); returns how many.

    `rows` are dicts or a table holding some of `REJECTED_SCHEMA`'s columns (the rest null);
    every row's `stage` is `stage`.
    """
    if not isinstance(rows, pa.Table):
        rows = pa.Table.from_pylist(rows, REJECTED_SCHEMA)
    table = as_rejected(rows, stage)
    (out_dir / "_rejected").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "_rejected" / f"{stage if part is None else f'{stage}-{part}'}.parquet")
    return table.num_rows
