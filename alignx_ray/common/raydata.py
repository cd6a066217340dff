"""What every Ray stage shares: joining the cluster, the resumable actor-pool map, rejects.

An actor stage maps a pool of stateful actors (one engine or index each) over a parquet
table, checkpointed by a stable id column, so a re-run skips the rows it had written. Its
actors are guarded (`ActorGuard`): a hung batch or a dead engine ends the actor's process, and
Ray restarts it and sends the batch again, within the pool's bounds (`PoolConfig`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
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
        # "local": a new instance even when a `ray start` cluster runs on this machine, which
        # ray.init() would otherwise join (and refuse num_cpus for).
        ray.init(
            address="local", num_cpus=config.num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False
        )
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
    """(rows, {leaf column path: (values, bytes in memory)}) of the parquet files under these
    folders, from their footers: the driver reads no table. A footer's sizes are after
    parquet's encodings (a text repeated on many rows, as a post is on each of its responses,
    is dictionary-encoded and counted about once), so each column's are scaled by its ratio of
    Arrow bytes to encoded bytes in the first row group of the folder's first file."""
    rows, columns = 0, {}
    for folder in folders:
        files = sorted(folder.rglob("*.parquet"))
        ratio = decoded_ratios(files[0]) if files else {}
        for f in files:
            meta = pq.read_metadata(f)
            rows += meta.num_rows
            for group in (meta.row_group(i) for i in range(meta.num_row_groups)):
                for chunk in (group.column(j) for j in range(group.num_columns)):
                    path = chunk.path_in_schema
                    values, size = columns.get(path, (0, 0))
                    decoded = int(chunk.total_uncompressed_size * ratio.get(path.split(".")[0], 1.0))
                    columns[path] = (values + chunk.num_values, size + decoded)
    return rows, columns


def decoded_ratios(path: Path, sample_rows: int = 256) -> dict[str, float]:
    """Per top-level column: Arrow bytes over parquet's encoded bytes, from the first
    `sample_rows` rows of the file's first row group (a few pages: a whole row group of
    persona lists is about 100 MB decoded, which the driver should not hold)."""
    file = pq.ParquetFile(path)
    if not file.metadata.num_row_groups or not file.metadata.row_group(0).num_rows:
        return {}
    meta = file.metadata.row_group(0)
    sample = next(file.iter_batches(batch_size=min(sample_rows, meta.num_rows), row_groups=[0]))
    share = sample.num_rows / meta.num_rows
    encoded = Counter()
    for chunk in (meta.column(j) for j in range(meta.num_columns)):
        encoded[chunk.path_in_schema.split(".")[0]] += chunk.total_uncompressed_size
    return {name: sample[name].nbytes / (encoded[name] * share) for name in sample.schema.names if encoded[name]}


def shuffle_partitions(*folders: Path, size: int = 0, partition_bytes: int = 256 * 2**20) -> int:
    """Partitions of a hash shuffle (a join or groupby) over these parquet folders (plus `size`
    bytes of other input): enough that each holds about `partition_bytes` of data in memory,
    so no worker's memory grows with the dataset, and at least one per two CPUs of the cluster,
    so every node works. Sizes come from the files' footers."""
    import ray

    size += sum(b for _, b in footer_columns(*folders)[1].values())
    cpus = ray.cluster_resources().get("CPU", 2) if ray.is_initialized() else os.cpu_count() or 2
    return max(1, int(cpus) // 2, -(-size // partition_bytes))


class EngineFailure(RuntimeError):
    """An engine that cannot serve any more (its process died, or a step failed inside it):
    only a fresh actor can go on. Engines raise it from the error, and `ActorGuard` exits."""


class StageFailed(RuntimeError):
    """An actor stage that could not finish: the reason, and why its actors exited."""


# The exit status of an actor that ended itself (a hung batch, a dead engine): not 0, so Ray
# counts a crash and restarts it, as it does for a killed or pre-empted one.
GUARD_EXIT_STATUS = 75


# How often a batch's watch looks at the engine's own processes.
ENGINE_POLL_S = 1.0


class ActorGuard:
    """A stage's UDF (`udf`, set per stage by `guarded`) inside its actor. A batch still running
    after `batch_timeout_s`, an `EngineFailure`, or the end of a process the engine runs in
    (the UDF's `engine_processes()`, e.g. vLLM's engine core on a GPU node, whose death leaves
    the offline call waiting) ends the actor's process after a record in the stage's fault
    ledger (`ledger`, a folder): Ray treats that as a crash, restarts the actor and sends the
    batch again. Exiting is the only way out of a call hung in native code, and a dead engine
    is never reused."""

    udf: type

    def __init__(self, udf_kwargs: dict, batch_timeout_s: float | None, ledger: str):
        self.batch_timeout_s = batch_timeout_s
        self.ledger = Path(ledger)
        self.inner = self.udf(**udf_kwargs)
        self.engine_processes = list(getattr(self.inner, "engine_processes", list)())

    def __call__(self, batch):
        self._check_engine()  # a call on an engine already dead would wait forever
        finished = threading.Event()
        if self.batch_timeout_s is not None or self.engine_processes:
            rows = getattr(batch, "num_rows", len(batch))
            threading.Thread(target=self._watch, args=(finished, rows), daemon=True).start()
        try:
            return self.inner(batch)
        except EngineFailure as e:
            self._exit("engine_failed", f"{e} ({e.__cause__!r})")
        finally:
            finished.set()

    def _watch(self, finished: threading.Event, rows: int) -> None:
        """Until the batch is done: the engine's processes every ENGINE_POLL_S, and its timeout."""
        started, limit = time.monotonic(), self.batch_timeout_s
        poll = ENGINE_POLL_S if self.engine_processes else math.inf
        while True:
            left = math.inf if limit is None else limit - (time.monotonic() - started)
            if finished.wait(max(0.0, min(poll, left))):
                return
            self._check_engine()
            if limit is not None and time.monotonic() - started >= limit:
                self._exit("batch_timeout", f"a batch of {rows} rows ran over batch_timeout_s={limit}")

    def _check_engine(self) -> None:
        import psutil

        for process in self.engine_processes:
            try:
                alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                self._exit("engine_dead", f"its engine's process {process.pid} has ended")

    def _exit(self, reason: str, detail: str) -> None:
        """Record why, end the processes this actor started (an engine core hung or dead must
        not outlive it), then its own."""
        import psutil

        self.ledger.mkdir(parents=True, exist_ok=True)
        record = {"reason": reason, "detail": detail, "pid": os.getpid(), "time": time.time()}
        (self.ledger / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        print(f"{self.udf.__name__} actor exits, for Ray to replace: {reason}: {detail}", file=sys.stderr, flush=True)
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(GUARD_EXIT_STATUS)


def guarded(udf: type) -> type:
    """`udf` wrapped in `ActorGuard`, under its own name (Ray Data names the stage after it)."""
    return type(udf.__name__, (ActorGuard,), {"udf": udf, "__qualname__": udf.__qualname__})


def exit_records(ledger: Path) -> list[dict]:
    """The actors of a stage that ended themselves (`ActorGuard`'s records), oldest first."""
    return sorted((json.loads(f.read_text()) for f in ledger.glob("*.json")), key=lambda r: r["time"])


def actor_pool_args(pool: PoolConfig) -> dict:
    """`map_batches` arguments of an actor pool: its size, each actor's resources (capped on a
    local instance, see `fit_local`) and how Ray restarts actors and retries their batches."""
    import ray.data

    num_cpus, num_gpus = fit_local(pool.num_cpus, pool.num_gpus)
    resources = dict(pool.resources)
    if _local_resources is not None and resources:
        missing = [k for k in resources if k not in _local_resources]
        if missing:
            logger.warning("local Ray instance: no %s resource; actors placed without it", missing)
        resources = {k: v for k, v in resources.items() if k in _local_resources}
    low, high = pool.concurrency
    args = dict(
        batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=pool.max_restarts,
    )
    if resources:
        args["resources"] = resources
    if pool.max_restarts != 0:  # Ray accepts task retries only for actors it restarts
        args["max_task_retries"] = pool.max_task_retries
    return args


def map_resumable(
    source: Path,
    output: Path,
    id_column: str,
    udf: type,
    udf_kwargs: dict,
    pool: PoolConfig,
    columns: list[str] | None = None,
    then: Sequence[tuple[type, dict]] = (),
) -> dict:
    """read_parquet(source) -> map_batches(udf actors) -> write_parquet(output), checkpointed;
    `columns`: only these reach the actors (None: all); `then`: further actor stages, each
    (class, constructor kwargs) in the same pool config, through which the rows pass in turn.
    Returns the stage's fault figures: `actor_exits`, the actors that ended themselves, by reason.

    Ray Data's CheckpointConfig records the ids of written rows beside `output` and filters
    them out of the input of a re-run (two-phase commit), so a killed stage resumes. An actor
    that dies (killed, pre-empted, a hung batch, a dead engine) is restarted and its batch sent
    again, at most `pool.max_restarts` / `pool.max_task_retries` times; a batch is written once.
    A constructor that fails is tried on `pool.init_retries` more actors; then the stage fails
    (`StageFailed`) with its error. A run that fails because a node was lost (block outputs on
    it that Ray cannot rebuild while their actor restarts) runs again, at most
    `pool.node_loss_reruns` times, skipping the rows it wrote, as a resubmitted job would.
    """
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ledger = output.parent / "_faults"
    shutil.rmtree(ledger, ignore_errors=True)
    ctx = ray.data.DataContext.get_current()
    init_deaths = ctx.max_consecutive_actor_init_deaths
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column,
        checkpoint_path=str((output.parent / "_checkpoint").resolve()),
        delete_checkpoint_on_success=False,
    )
    ctx.max_consecutive_actor_init_deaths = pool.init_retries
    node_lost = (ray.exceptions.ActorUnavailableError, ray.exceptions.ObjectLostError)
    try:
        for reruns_left in range(pool.node_loss_reruns, -1, -1):
            ds = ray.data.read_parquet(str(source.resolve()))
            if columns is not None:
                ds = ds.select_columns(columns)
            for stage, kwargs in [(udf, udf_kwargs), *then]:
                ds = ds.map_batches(
                    guarded(stage),
                    fn_constructor_kwargs=dict(
                        udf_kwargs=kwargs, batch_timeout_s=pool.batch_timeout_s, ledger=str(ledger.resolve())
                    ),
                    batch_format="pyarrow",
                    **actor_pool_args(pool),
                )
            try:
                ds.write_parquet(str(output.resolve()))
                break
            except node_lost as e:
                if not reruns_left:
                    raise
                logger.warning("%s: a node was lost (%s); running again without the rows written", udf.__name__, e)
    except Exception as e:
        exits = exit_records(ledger)
        why = f"; its actors ended themselves {len(exits)} times, the last: {exits[-1]['detail']}" if exits else ""
        raise StageFailed(f"{udf.__name__}: {error_summary(e)}{why}") from e
    finally:
        ctx.checkpoint_config = None
        ctx.max_consecutive_actor_init_deaths = init_deaths
    return {"actor_exits": dict(Counter(r["reason"] for r in exit_records(ledger)))}


def error_summary(error: BaseException) -> str:
    """The line of an error that says what went wrong: Ray wraps a worker's error in its
    traceback, whose last `Name: message` line is the cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if line.split(":", 1)[0].replace(".", "").isidentifier() and ": " in line]
    return f"{type(error).__name__}: {causes[-1] if causes else (lines[-1] if lines else '')}"


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
