"""The dataset build at 11k responses gives, row for row, the train and test splits recorded in
`tests/data/build-11k.json` before the build was rewritten to stream at million-example scale.

The input is the demo's generator with the planted levels as the annotations (no LLM); the
stages run with the code's default settings (one CPU actor). The fixture holds a digest of
every row (all columns, the official schema), keyed by example id, so a change to any row,
a row lost or a row added fails with the ids it concerns. Record it again (only for a
deliberate change of the dataset, said in the commit) with:

    python tests/test_build_equality.py --record
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

FIXTURE = Path(__file__).parent / "data" / "build-11k.json"
N_THREADS, N_USERS, SEED = 2000, 200, 3


def row_digests(split_dir: Path) -> dict[str, str]:
    """example_id -> sha256 (16 hex digits) of the row's canonical JSON."""
    rows = pq.read_table(split_dir).to_pylist()
    return {
        row["example_id"]: hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16] for row in rows
    }


def build(work: Path) -> dict[str, dict[str, str]]:
    """Pairs, personas and assembly on the planted corpus; the digests of train and test."""
    from cpu import cpu_pool

    from alignx_ray.build.assemble import AssembleConfig, run_assemble
    from alignx_ray.build.pairs import PairsConfig, run_pairs
    from alignx_ray.build.personas import PersonaConfig, run_personas
    from alignx_ray.fixtures import synthetic

    config = synthetic.SyntheticConfig(n_threads=N_THREADS, n_users=N_USERS, seed=SEED)
    synthetic.write_planted_annotations(config, work / "annotate" / "data")
    run_pairs(PairsConfig(), work / "annotate", work / "pairs")
    run_personas(PersonaConfig(pool=cpu_pool(1024)), work / "annotate", work / "pairs", work / "personas")
    run_assemble(AssembleConfig(), work / "annotate", work / "pairs", work / "personas", None, work / "dataset")
    return {split: row_digests(work / "dataset" / split) for split in ("train", "test")}


def test_build_at_11k_responses_equals_the_recorded_dataset(ray_local, tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    built = build(tmp_path)
    for split in ("train", "test"):
        want, got = recorded[split], built[split]
        lost, added = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        changed = sorted(i for i in set(want) & set(got) if want[i] != got[i])
        assert not (lost or added or changed), (
            f"{split}: {len(lost)} rows lost {lost[:5]}, {len(added)} added {added[:5]}, "
            f"{len(changed)} changed {changed[:5]} (of {len(want)} recorded)"
        )
    assert len(built["train"]) > 1000 and len(built["test"]) > 50  # a dataset worth comparing


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    from alignx_ray.common.config import RayConfig
    from alignx_ray.common.raydata import init_ray

    init_ray(RayConfig(num_cpus=4))
    with tempfile.TemporaryDirectory() as scratch:
        digests = build(Path(scratch))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(digests, indent=0, sort_keys=True) + "\n")
    print(f"recorded {FIXTURE}: " + ", ".join(f"{k} {len(v)} rows" for k, v in digests.items()))
