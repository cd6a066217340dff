"""The cluster files carry what Ray's launcher and KubeRay need, and point at real entrypoints."""

import shlex
from pathlib import Path

import yaml

from alignx_ray.common.config import load_config
from alignx_ray.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_yaml_autoscales_gpu_workers_from_zero():
    spec = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "max_workers",
        "idle_timeout_minutes",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in spec, key
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types and types[spec["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != spec["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] <= spec["max_workers"] for t in workers.values())
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values())
    assert all("node_config" in t and "resources" in t for t in types.values())
    assert any("--autoscaling-config" in c for c in spec["head_start_ray_commands"])
    assert any("[gpu]" in c for c in spec["setup_commands"])


def test_rayjob_retries_and_autoscales_with_a_real_entrypoint():
    import ray

    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the image and the code agree on Ray
    assert cluster["enableInTreeAutoscaling"] is True and "idleTimeoutSeconds" in cluster["autoscalerOptions"]
    groups = cluster["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in groups)
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]
    ]
    assert any(gpu_limits)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" in runtime_env and "env_vars" in runtime_env
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert load_config(RunConfig, ROOT / config).annotate.pool.num_gpus >= 1
