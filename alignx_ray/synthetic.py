"""Embedded demo data: forum threads whose responses carry planted traits.

Every response is written by a simulated commenter with a fixed trait profile and
states some of those traits in sentences from the phrase bank (`traits.yaml`), so
the true intensity level of every response on every dimension is known. The demo
annotator is trained on these threads and every later stage is checked against
that truth. Levels: 3 = positive pole, 1 = negative pole, 2 = not reflected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

N_DIMS = 90
HIGH, NEUTRAL, LOW = 3, 2, 1

THREADS_SCHEMA = pa.schema(
    [
        ("thread_id", pa.string()),
        ("post", pa.string()),
        (
            "responses",
            pa.list_(pa.struct([("response_id", pa.string()), ("text", pa.string())])),
        ),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [
        ("response_id", pa.string()),
        ("thread_id", pa.string()),
        ("user_id", pa.string()),
        ("levels", pa.list_(pa.uint8())),
    ]
)


# 16 dimensions from every source group: age, neuroticism, extraversion, communication style,
# order, autonomy, play, harmlessness, helpfulness, gaming, sports, pets, gourmet food, humor,
# painting, fitness.
DEMO_PLANTED_DIMENSIONS = (0, 2, 3, 16, 23, 31, 39, 40, 44, 52, 56, 59, 64, 73, 76, 81)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the demo corpus; every (lo, hi) range is inclusive."""

    n_threads: int = 240
    responses_per_thread: tuple[int, int] = (3, 8)
    n_users: int = 120
    traits_per_user: tuple[int, int] = (4, 8)
    # Dimensions traits are drawn from (None: all 90). A smaller set gives each trait more
    # examples to learn from.
    planted_dimensions: tuple[int, ...] | None = DEMO_PLANTED_DIMENSIONS
    traits_per_response: tuple[int, int] = (2, 5)
    filler_sentences: tuple[int, int] = (1, 3)
    seed: int = 0

    def __post_init__(self) -> None:
        ranges = (
            self.responses_per_thread,
            self.traits_per_user,
            self.traits_per_response,
            self.filler_sentences,
        )
        if any(not 0 <= lo <= hi for lo, hi in ranges) or self.traits_per_user[1] > len(self.pool()):
            raise ValueError(f"bad range in {self}")
        if self.n_users < 1 or self.n_threads < 0:
            raise ValueError(f"need n_users >= 1 and n_threads >= 0, got {self}")

    def pool(self) -> list[int]:
        """The dimensions traits are drawn from."""
        return list(range(N_DIMS)) if self.planted_dimensions is None else list(self.planted_dimensions)


@cache
def phrase_bank() -> dict:
    """The parsed `traits.yaml`, checked to cover exactly the 90 dimensions, each with its
    own `high_cue` and `low_cue` word (all 180 distinct)."""
    text = resources.files("alignx_ray").joinpath("traits.yaml").read_text(encoding="utf-8")
    bank = yaml.safe_load(text)
    if len(bank["dimensions"]) != N_DIMS:
        raise ValueError(f"traits.yaml has {len(bank['dimensions'])} dimensions, expected {N_DIMS}")
    cues = [d.get(key) for d in bank["dimensions"] for key in ("high_cue", "low_cue")]
    if not all(isinstance(c, str) and c for c in cues) or len(set(cues)) != len(cues):
        raise ValueError("traits.yaml needs a distinct high_cue and low_cue on every dimension")
    return bank


def templates(dim: int, level: int) -> list[str]:
    """The sentences that state pole `level` (HIGH or LOW) of dimension `dim`."""
    return phrase_bank()["dimensions"][dim]["high" if level == HIGH else "low"]


def corpus_text() -> list[str]:
    """Every sentence the generator can emit, so a tokenizer can learn its words."""
    bank = phrase_bank()
    texts = [
        s for d in bank["dimensions"] for s in (d["high_cue"], d["low_cue"], *d["high"], *d["low"])
    ]
    for topic in bank["topics"]:
        texts += [*topic["post"], *topic["filler"]]
        texts += [s.format(topic=topic["name"]) for s in bank["post_openers"] + bank["generic_filler"]]
    return texts + bank["post_closers"]


def _draw(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _pick(rng: np.random.Generator, items: list, k: int) -> list:
    """k distinct items in random order."""
    return [items[i] for i in rng.choice(len(items), size=k, replace=False)]


def _user_profiles(config: SyntheticConfig, rng: np.random.Generator) -> list[dict[int, int]]:
    """One persistent {dimension: pole} profile per commenter, so users stay recognisable."""
    profiles, pool = [], config.pool()
    for _ in range(config.n_users):
        dims = sorted(_pick(rng, pool, _draw(rng, config.traits_per_user)))
        profiles.append({d: int(rng.choice([LOW, HIGH])) for d in dims})
    return profiles


def _post(topic: dict, rng: np.random.Generator) -> str:
    """Opener, one or two body sentences and maybe a closer: 2 to 4 sentences."""
    bank = phrase_bank()
    sentences = [_pick(rng, bank["post_openers"], 1)[0].format(topic=topic["name"])]
    sentences += _pick(rng, topic["post"], _draw(rng, (1, 2)))
    if rng.random() < 0.5:
        sentences += _pick(rng, bank["post_closers"], 1)
    return " ".join(sentences)


def _response(
    profile: dict[int, int], topic: dict, config: SyntheticConfig, rng: np.random.Generator
) -> tuple[str, list[int]]:
    """Text stating a random subset of the author's traits among on-topic filler, and its levels."""
    n = len(profile)
    lo, hi = config.traits_per_response
    dims = sorted(_pick(rng, sorted(profile), _draw(rng, (min(lo, n), min(hi, n)))))
    levels = [NEUTRAL] * N_DIMS
    sentences = []
    for d in dims:
        levels[d] = profile[d]
        sentences += _pick(rng, templates(d, profile[d]), 1)
    fillers = topic["filler"] + [s.format(topic=topic["name"]) for s in phrase_bank()["generic_filler"]]
    sentences += _pick(rng, fillers, _draw(rng, config.filler_sentences))
    return " ".join(_pick(rng, sentences, len(sentences))), levels


def generate(config: SyntheticConfig = SyntheticConfig()) -> tuple[list[dict], list[dict]]:
    """Threads (what a forum would give us) and the planted truth, kept as separate records.

    Thread: {"thread_id", "post", "responses": [{"response_id", "text"}]}.
    Truth: {"response_id", "thread_id", "user_id", "levels": 90 ints in {1, 2, 3}}.
    """
    rng = np.random.default_rng(config.seed)
    profiles = _user_profiles(config, rng)
    topics = phrase_bank()["topics"]
    threads, truth = [], []
    for i in range(config.n_threads):
        thread_id = f"t{config.seed}-{i:05d}"
        topic = topics[int(rng.integers(len(topics)))]
        responses = []
        for j in range(_draw(rng, config.responses_per_thread)):
            user = int(rng.integers(config.n_users))
            text, levels = _response(profiles[user], topic, config, rng)
            response_id = f"{thread_id}-r{j}"
            responses.append({"response_id": response_id, "text": text})
            truth.append(
                {
                    "response_id": response_id,
                    "thread_id": thread_id,
                    "user_id": f"u{config.seed}-{user:04d}",
                    "levels": levels,
                }
            )
        threads.append({"thread_id": thread_id, "post": _post(topic, rng), "responses": responses})
    return threads, truth


def generate_threads(config: SyntheticConfig = SyntheticConfig()) -> list[dict]:
    """Only the thread records, as an ingest stage would see them."""
    return generate(config)[0]


def planted_levels(config: SyntheticConfig = SyntheticConfig()) -> list[dict]:
    """Only the truth rows, one per response."""
    return generate(config)[1]


def iter_examples(config: SyntheticConfig = SyntheticConfig()) -> Iterator[tuple[str, str, list[int]]]:
    """(post, response text, levels) triples for training the demo annotator."""
    threads, truth = generate(config)
    rows = iter(truth)
    for thread in threads:
        for response in thread["responses"]:
            yield thread["post"], response["text"], next(rows)["levels"]


def write_threads(config: SyntheticConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write threads.jsonl, threads.parquet and truth.parquet; return their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads, truth = generate(config)
    paths = {
        "jsonl": out / "threads.jsonl",
        "threads": out / "threads.parquet",
        "truth": out / "truth.parquet",
    }
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in threads)
    paths["jsonl"].write_text(lines, encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(threads, schema=THREADS_SCHEMA), paths["threads"])
    pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), paths["truth"])
    return paths
