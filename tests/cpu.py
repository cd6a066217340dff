"""The CPU settings the tests run with: those of `configs/demo.yaml`, the embedded default.

Code defaults are production's (GPU nodes); a test starts from the demo's config and
changes only what it is about, so the CPU settings have one home.
"""

from pathlib import Path

import yaml

from alignx_ray.common.config import PoolConfig, load_config
from alignx_ray.engines.scoring import EngineConfig
from alignx_ray.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "configs" / "demo.yaml"
DEMO = load_config(RunConfig, DEMO_YAML)


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key, nested sections merged."""
    out = dict(base)
    for key, value in changes.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both_dicts else value
    return out


def demo_dict(changes: dict | None = None) -> dict:
    """The demo config as plain data, with `changes` merged in."""
    return merged(yaml.safe_load(DEMO_YAML.read_text()), changes or {})


def write_config(path: Path, changes: dict | None = None) -> Path:
    """A config file: the demo's, with `changes`."""
    path.write_text(yaml.safe_dump(demo_dict(changes)))
    return path


def cpu_engine(**fields) -> EngineConfig:
    """The demo's CPU engine (vLLM's CPU build settings, float32, the dense tree mask)."""
    return EngineConfig.model_validate({**DEMO.annotate.engine.model_dump(), **fields})


def cpu_pool(batch_size: int) -> PoolConfig:
    """One single-CPU actor."""
    return PoolConfig(batch_size=batch_size, concurrency=(1, 1), num_cpus=1, num_gpus=0)
