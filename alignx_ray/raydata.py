"""The Ray Data pattern every actor stage shares: an autoscaling actor pool mapped over a
parquet table and checkpointed by a stable id column, so a re-run skips written rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ActorPool:
    """Batch size and resources of a stage's actors; Ray Data scales between concurrency (min, max)."""

    batch_size: int
    concurrency: tuple[int, int]
    num_cpus: float
    num_gpus: float


def map_resumable(source: Path, output: Path, id_column: str, udf: type, udf_kwargs: dict, pool: ActorPool) -> None:
    """read_parquet(source) -> map_batches(udf actors) -> write_parquet(output), checkpointed.

    Ray Data's CheckpointConfig records the ids of written rows beside `output` and filters
    them out of the input of a re-run (two-phase commit), so a killed stage resumes.
    """
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column, checkpoint_path=str((output.parent / "_checkpoint").resolve()),
        delete_checkpoint_on_success=False,
    )
    try:
        ds = ray.data.read_parquet(str(source.resolve()))
        low, high = pool.concurrency
        ds = ds.map_batches(udf, fn_constructor_kwargs=udf_kwargs, batch_size=pool.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus)
        ds.write_parquet(str(output.resolve()))
    finally:
        ctx.checkpoint_config = None
