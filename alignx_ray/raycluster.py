"""Connecting to Ray: the cluster a job was submitted to, a given address, or a local instance."""

from __future__ import annotations

import os

from alignx_ray.config import RayConfig

# Engines in actors run single-process on CPU; these keep vLLM from forking its own workers.
WORKER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(config: RayConfig):
    """Join the cluster of `ray job submit` (RAY_ADDRESS), `config.address`, or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": WORKER_ENV}
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=config.num_cpus, runtime_env=env, include_dashboard=False, log_to_driver=False)
    return ray
