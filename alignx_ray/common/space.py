"""The AlignX preference space: named dimensions, intensity levels and direction vectors.

A direction vector holds one float per dimension: 1.0 (positive pole), 0.5 (neutral) or
0.0 (negative pole). Its text form, the PBA profile, lists the labels of the non-neutral
dimensions in space order, joined by ", ".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import yaml

POSITIVE, NEUTRAL, NEGATIVE = 1.0, 0.5, 0.0
DIRECTIONS = (POSITIVE, NEUTRAL, NEGATIVE)
SEPARATOR = ", "

L = 3  # intensity levels per dimension
LEVEL_HIGH, LEVEL_MEDIAN, LEVEL_LOW = 3, 2, 1
# The one option <-> level mapping. Answer options of the intensity prompt, in order:
# (1) high / likes, (2) low / dislikes, (3) cannot reflect.
OPTION_LEVELS = (LEVEL_HIGH, LEVEL_LOW, LEVEL_MEDIAN)
OPTION_TO_LEVEL = {i + 1: level for i, level in enumerate(OPTION_LEVELS)}  # option number -> level
LEVEL_TO_OPTION_INDEX = {level: i for i, level in enumerate(OPTION_LEVELS)}  # level -> option index
CANNOT_REFLECT = "Comments alone cannot reflect"
OFFICIAL_D = 90


@dataclass(frozen=True)
class Dimension:
    """One axis of the preference space.

    name: the paper's name (or the platform tag); group: its source in Table 6.
    question / options: intensity-annotation question and answers (positive, negative, unclear).
    positive / negative: profile-text labels for direction 1.0 / 0.0.
    demo_labels: (positive, negative) values for the demographic-annotation prompt.
    keyword: the tag word when the dimension is a platform tag.
    """

    name: str
    group: str
    question: str
    options: tuple[str, str, str]
    positive: str
    negative: str
    demo_labels: tuple[str, str] | None = None
    keyword: str | None = None

    def __post_init__(self) -> None:
        if len(self.options) != 3 or self.options[2] != CANNOT_REFLECT:
            raise ValueError(f"{self.name!r}: need 3 options ending with {CANNOT_REFLECT!r}")
        if not self.positive or not self.negative:
            raise ValueError(f"{self.name!r}: positive and negative labels must be non-empty")


def intensity_embedding(levels: np.ndarray, n_levels: int = L) -> np.ndarray:
    """(N, D) levels 1..L -> (N, D * L) float32 one-hot codes; code . code = equal dimensions."""
    levels = np.asarray(levels)
    one_hot = np.eye(n_levels, dtype=np.float32)[levels.astype(np.int64) - 1]
    return one_hot.reshape(len(levels), levels.shape[1] * n_levels)


def flip_direction(direction: Sequence[float] | None) -> tuple[float, ...] | None:
    """The opposite direction (Table 5's reversal): positive and negative swap, neutral stays."""
    return None if direction is None else tuple(1.0 - v for v in direction)


def level_to_direction(levels) -> np.ndarray:
    """Direction of a single response (paper §4.2): above the median level is positive."""
    return compare_levels(levels, LEVEL_MEDIAN)


def direction_bytes(directions) -> np.ndarray:
    """Directions (0, 0.5 or 1 per dimension) as one byte each (0, 1, 2): exact, an eighth of
    their float64 size."""
    return np.rint(np.asarray(directions, np.float64) * 2).astype(np.uint8)


def level_direction_bytes(levels: np.ndarray) -> np.ndarray:
    """`direction_bytes(level_to_direction(levels))` of uint8 levels, computed in bytes: a
    persona stage takes it of millions of candidates a batch, where float64 would be 8x."""
    return (np.sign(levels.astype(np.int8) - np.int8(LEVEL_MEDIAN)) + 1).astype(np.uint8)


def byte_directions(codes) -> np.ndarray:
    """The inverse of `direction_bytes`: float64 directions."""
    return np.asarray(codes).astype(np.float64) / 2


def compare_levels(levels_w, levels_l) -> np.ndarray:
    """Direction of a pair (paper §4.1): positive where y_w is more intense than y_l."""
    return 0.5 * (np.sign(np.asarray(levels_w, np.int64) - np.asarray(levels_l, np.int64)) + 1.0)


class PreferenceSpace:
    """An immutable, ordered tuple of dimensions with unique names and unique labels.

    Unique labels are what makes a profile text parse back to exactly one vector.
    """

    __slots__ = ("_dimensions",)

    def __init__(self, dimensions: Iterable[Dimension]):
        dims = tuple(dimensions)
        _reject_duplicates([d.name for d in dims], "dimension name")
        _reject_duplicates([label for d in dims for label in (d.positive, d.negative)], "label")
        object.__setattr__(self, "_dimensions", dims)

    def __setattr__(self, key, value):
        raise AttributeError("PreferenceSpace is immutable")

    def __reduce__(self):  # pickling (Ray ships the space to actors) goes through __init__
        return PreferenceSpace, (self._dimensions,)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> PreferenceSpace:
        """Build a space from config dicts with the keys of Dimension."""
        return cls(_dimension_from_record(r) for r in records)

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        return self._dimensions

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self._dimensions)

    def __len__(self) -> int:
        return len(self._dimensions)

    def __getitem__(self, index):
        return self._dimensions[index]

    def extend(self, dimensions: Iterable[Dimension]) -> PreferenceSpace:
        """A new space with extra dimensions appended (e.g. Humor, Pragmatism in §6.3)."""
        return PreferenceSpace(self._dimensions + tuple(dimensions))

    def demo_dimensions(self) -> tuple[Dimension, ...]:
        """Dimensions the demographic-annotation prompt asks about."""
        return tuple(d for d in self._dimensions if d.demo_labels is not None)

    def keyword_dimensions(self) -> tuple[Dimension, ...]:
        """Platform-tag dimensions, annotated as like/dislike keywords."""
        return tuple(d for d in self._dimensions if d.keyword is not None)

    def describe_direction(self, direction: Sequence[float]) -> str:
        """PBA profile text: labels of the non-neutral dimensions, in space order."""
        if len(direction) != len(self):
            raise ValueError(f"direction has {len(direction)} values, space has {len(self)}")
        labels = []
        for dim, value in zip(self._dimensions, direction):
            if value not in DIRECTIONS:
                raise ValueError(f"{dim.name!r}: direction {value!r} is not one of {DIRECTIONS}")
            if value != NEUTRAL:
                labels.append(dim.positive if value == POSITIVE else dim.negative)
        return SEPARATOR.join(labels)

    def parse_profile(self, text: str) -> list[float]:
        """Exact inverse of describe_direction.

        Labels may contain ", ", so the text is matched label by label in space order,
        backtracking when a match leads to a dead end.
        """
        direction = [NEUTRAL] * len(self)
        if not text:
            return direction
        dead_ends: set[tuple[int, int]] = set()
        furthest = 0

        def match_from(pos: int, first_dim: int) -> bool:
            nonlocal furthest
            furthest = max(furthest, pos)
            if pos == len(text):
                return True
            if (pos, first_dim) in dead_ends:
                return False
            for index in range(first_dim, len(self)):
                dim = self._dimensions[index]
                for value, label in ((POSITIVE, dim.positive), (NEGATIVE, dim.negative)):
                    if not text.startswith(label, pos):
                        continue
                    end = pos + len(label)
                    if end == len(text):
                        next_pos = end
                    elif text.startswith(SEPARATOR, end) and end + len(SEPARATOR) < len(text):
                        next_pos = end + len(SEPARATOR)
                    else:
                        continue
                    direction[index] = value
                    if match_from(next_pos, index + 1):
                        return True
                    direction[index] = NEUTRAL
            dead_ends.add((pos, first_dim))
            return False

        if not match_from(0, 0):
            raise ValueError(f"cannot parse profile text from: {text[furthest:]!r}")
        return direction

    @staticmethod
    def aggregate_directions(vectors: Sequence[Sequence[float]], t1=0.6, t2=0.4) -> list[float]:
        """Merge several direction vectors into one (Appendix B.1).

        The element-wise mean becomes positive at >= t1 and negative at <= t2. If that
        leaves nothing to describe, the most extreme dimension is kept so the profile
        still carries a signal.
        """
        if not t2 < t1:
            raise ValueError(f"need t2 < t1, got t1={t1}, t2={t2}")
        if len(vectors) == 0:
            raise ValueError("no direction vectors to aggregate")
        if len({len(v) for v in vectors}) != 1:
            raise ValueError("direction vectors have different lengths")
        means = np.asarray(vectors, dtype=float).mean(axis=0)
        result = np.where(means >= t1, POSITIVE, np.where(means <= t2, NEGATIVE, NEUTRAL))
        if np.all(result == NEUTRAL):
            distance = np.abs(means - NEUTRAL)
            strongest = int(np.argmax(distance))  # argmax picks the lowest index on ties
            if distance[strongest] > 0:
                result[strongest] = POSITIVE if means[strongest] > NEUTRAL else NEGATIVE
        return result.tolist()


def _reject_duplicates(values: list[str], what: str) -> None:
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise ValueError(f"duplicate {what}: {repeated}")


def _dimension_from_record(record: dict) -> Dimension:
    fields = dict(record)
    fields["options"] = tuple(fields["options"])
    if fields.get("demo_labels") is not None:
        fields["demo_labels"] = tuple(fields["demo_labels"])
    return Dimension(**fields)


def _load_official_dimensions() -> tuple[Dimension, ...]:
    text = resources.files(__package__).joinpath("dimensions.yaml").read_text(encoding="utf-8")
    return tuple(_dimension_from_record(record) for record in yaml.safe_load(text))


DIMENSIONS = _load_official_dimensions()
SPACE = PreferenceSpace(DIMENSIONS)


def describe_direction(direction: Sequence[float], space: PreferenceSpace = SPACE) -> str:
    return space.describe_direction(direction)


def parse_profile(text: str, space: PreferenceSpace = SPACE) -> list[float]:
    return space.parse_profile(text)


def aggregate_directions(vectors: Sequence[Sequence[float]], t1=0.6, t2=0.4) -> list[float]:
    return PreferenceSpace.aggregate_directions(vectors, t1, t2)


def check_official(direction: Sequence[float]) -> None:
    """The official data schema stores exactly the 90 original dimensions."""
    if len(direction) != OFFICIAL_D:
        raise ValueError(f"official directions have {OFFICIAL_D} values, got {len(direction)}")
