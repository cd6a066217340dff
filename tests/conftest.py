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
