"""Determinism: random streams and cache keys that depend on content, never on order of work.

A resumed or re-partitioned run draws exactly what an uninterrupted one drew, because every
draw is seeded from the ids it concerns, and a stage is reused only under the same key.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np


def seeded_rng(*parts) -> np.random.Generator:
    """A random stream determined by `parts` alone (ids, seeds), never by order of work."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
