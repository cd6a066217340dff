"""A run on a two-node local cluster whose engine node is pre-empted in annotation and again in
the persona stage (test_preemption.py starts it in a process of its own: it needs a Ray
instance of its own). The head runs the driver's reads and writes; only the worker node offers
the `preemptible` resource that the stages' actors ask for. Once a stage's actor is at work,
the worker node is removed (its raylet and every process on it killed) and a new one added.

    python preemption_run.py CONFIG RUN_DIR   ->   last line: JSON {stage: figures}
"""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import ray.data
from ray._private.state import actors
from ray.cluster_utils import Cluster

from alignx_ray.common.config import load_config
from alignx_ray.run import Run, RunConfig

WORKER = {"num_cpus": 1, "resources": {"preemptible": 1}}


def live_actor(udf: str, node_id: str) -> bool:
    return any(
        udf in a["ActorClassName"] and a["State"] == "ALIVE" and a["Address"]["NodeID"] == node_id
        for a in actors().values()
    )


def preempt_when(cluster: Cluster, node, ready, stage) -> tuple[dict, object]:
    """Run `stage` on a thread; once `ready()` holds, remove `node` and add a new worker node."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(stage)
    deadline = time.time() + 600
    while not ready() and not future.done() and time.time() < deadline:
        time.sleep(0.1)
    assert not future.done(), f"the stage ended before its node could be pre-empted: {future.result()}"
    cluster.remove_node(node, allow_graceful=False)
    new_node = cluster.add_node(**WORKER)
    return future.result(timeout=900), new_node


def main(config_path: str, run_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    node = cluster.add_node(**WORKER)
    config = load_config(RunConfig, config_path, [f"ray.address={cluster.address}"])
    # As `init_ray` does on a local instance: the V2 Parquet reader's 32 footer-reading actors
    # per read would crowd these two small nodes.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    run = Run(config, Path(run_dir))
    run.ingest()
    done = {}
    done["annotate"], node = preempt_when(
        cluster, node, lambda: any((run.dir("annotate") / "data").glob("*.parquet")), run.annotate
    )
    run.pairs()
    done["personas"], node = preempt_when(cluster, node, lambda: live_actor("PersonaUDF", node.node_id), run.personas)
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(done, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
