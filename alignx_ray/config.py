"""Typed configuration loaded from `configs/*.yaml`.

Every field has a default that serves the embedded demo; production configs override what
they need. `--set a.b=value` on the command line overrides one field (value parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

from alignx_ray.space import SPACE, PreferenceSpace

Config = TypeVar("Config", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RayConfig(Section):
    """How to reach Ray.

    address: None starts a local instance (or joins the one `ray job submit` runs under).
    num_cpus: logical CPUs of a local instance; Ray Data's checkpoint filter and the engine
        actors each hold one, so the demo asks for 4 even on a 2-core machine.
    """

    address: str | None = None
    num_cpus: int | None = 4


class SpaceConfig(Section):
    """Extra dimensions appended to the official 90 (paper §6.3), as dimension records."""

    extra_dimensions: list[dict] = []

    def build(self) -> PreferenceSpace:
        return SPACE.extend(PreferenceSpace.from_records(self.extra_dimensions)) if self.extra_dimensions else SPACE


def resolve_local(path: str) -> str:
    """An existing local path made absolute (Ray workers run in another directory); URIs and
    model-store names unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def load_config(cls: type[Config], path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (or nothing: all defaults), apply dotted `key=value` overrides, validate."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = data or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return cls.model_validate(data)
