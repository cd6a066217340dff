"""The personas job with its pools sharded across chained actor stages, on a real local Ray
instance, writes the rows of the one-stage job."""

import pyarrow.parquet as pq
from cpu import cpu_pool

from alignx_ray.build.pairs import PairsConfig, run_pairs
from alignx_ray.build.personas import PersonaConfig, run_personas
from alignx_ray.fixtures import synthetic


def test_sharded_job_writes_the_rows_of_one_stage(ray_local, tmp_path):
    responses = synthetic.planted_annotations(synthetic.SyntheticConfig(n_threads=40, n_users=12, seed=5))
    (tmp_path / "annotate" / "data").mkdir(parents=True)
    pq.write_table(responses, tmp_path / "annotate" / "data" / "part-0.parquet")
    run_pairs(PairsConfig(pairs_per_thread=2), tmp_path / "annotate", tmp_path / "pairs")
    config = PersonaConfig(items=6, candidates=40, pool=cpu_pool(16))
    sharded = config.model_copy(update={"shard_rows": responses.num_rows // 3 + 1})  # 3 shards of ~70 rows
    one = run_personas(config, tmp_path / "annotate", tmp_path / "pairs", tmp_path / "one")
    three = run_personas(sharded, tmp_path / "annotate", tmp_path / "pairs", tmp_path / "three")
    rows = {name: pq.read_table(tmp_path / name / "data").sort_by("pair_id") for name in ("one", "three")}
    assert rows["one"].num_rows == pq.read_table(tmp_path / "pairs" / "data").num_rows > 0
    assert rows["three"].equals(rows["one"]) and one["ugc_items_mean"] > 0
    assert {k: v for k, v in three.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
