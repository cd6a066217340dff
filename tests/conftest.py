"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """Directory holding the official AlignX release files the tests compare against."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "official"
    path = Path(os.environ.get("ALIGNX_OFFICIAL_DIR") or default)
    if not path.is_dir():
        pytest.skip("official data not found: set ALIGNX_OFFICIAL_DIR")
    return path


# The vLLM CPU engine: single process, small KV cache (see EngineConfig.vllm_env).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen2 model with its trained tokenizer, built once per session."""
    from alignx_ray.fixtures.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def annotator_dir() -> Path:
    """The demo's tiny annotator, the one the package ships (checked against its manifest)."""
    from alignx_ray.fixtures.synthetic import DEMO_PLANTED_DIMENSIONS
    from alignx_ray.fixtures.tiny_annotator import shipped_annotator

    return shipped_annotator(DEMO_PLANTED_DIMENSIONS)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (the demo's: 4 logical CPUs)."""
    from cpu import DEMO

    from alignx_ray.common.raydata import init_ray

    ray = init_ray(DEMO.ray)
    yield ray
    ray.shutdown()
