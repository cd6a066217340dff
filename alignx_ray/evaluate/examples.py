"""Evaluation examples (paper §6, Appendix C.1) from the official benchmark files.

A benchmark is either an official JSON list (UF-P-4, PRISM, P-SOUPS: `prompt`, `chosen`,
`rejected`, persona keys of the AlignX schema, and for PBA a `profile` text) or an AlignX
parquet (AlignX_test). Every row becomes one `Example`; a row that cannot be evaluated
becomes a rejected record with its reason.

For each example, a *variant* is what one scoring pass sees: the persona type (`ugc`,
`pair`, `demo` or `all`), the history size (the number of persona items kept, seeded per
example), and whether preferences are reversed (Table 5). Its prompt is the method's format
(Appendix B.2): ICA puts the chosen persona items in context; PBA describes P~.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from alignx_ray.common import prompts, schema
from alignx_ray.common.config import resolve_local
from alignx_ray.common.raydata import fit_local, write_rejected
from alignx_ray.common.schema import VARIANTS_SCHEMA
from alignx_ray.common.seeding import seeded_rng
from alignx_ray.common.space import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    SPACE,
    PreferenceSpace,
    aggregate_directions,
    compare_levels,
    flip_direction,
    level_to_direction,
)
from alignx_ray.engines.labelling import QuestionBank, label_batch
from alignx_ray.engines.scoring import EngineConfig, make_engine
from alignx_ray.evaluate.eval_config import EvalConfig

PersonaType = Literal["ugc", "pair", "demo", "all"]
PERSONA_TYPES: tuple[str, ...] = ("ugc", "pair", "demo", "all")


@dataclass(frozen=True)
class Example:
    """One benchmark row. Item directions and `gold` (P_{yw>yl}) are None where the file has none."""

    example_id: str
    prompt: str
    chosen: str
    rejected: str
    ugc: tuple[dict, ...] = ()
    pairs: tuple[dict, ...] = ()
    demographic: str = ""
    profile: str | None = None
    gold: tuple[float, ...] | None = None

    def has(self, persona: str) -> bool:
        return {
            "ugc": bool(self.ugc),
            "pair": bool(self.pairs),
            "demo": bool(self.demographic),
            "all": bool(self.ugc or self.pairs or self.demographic),
        }[persona]


@dataclass(frozen=True)
class Variant:
    """What one scoring pass of an example sees."""

    example: Example
    persona: str
    history: int | None  # persona items kept; None: all the example has
    reversed: bool = False
    ugc: tuple[dict, ...] = field(default=())
    pairs: tuple[dict, ...] = field(default=())
    demographic: str = ""

    @property
    def row_id(self) -> str:
        return f"{self.example.example_id}|{self.persona}|h{self.history or 'all'}|{'rev' if self.reversed else 'orig'}"


def load_benchmark(uri: str, n_dims: int = len(SPACE)) -> tuple[list[Example], list[dict]]:
    """(examples, rejected rows with `reason`) of an official JSON benchmark or an AlignX
    parquet file or folder, local or any pyarrow filesystem URI (s3://, gs://, ...)."""
    fs, path = (
        pafs.FileSystem.from_uri(uri) if "://" in str(uri) else (pafs.LocalFileSystem(), str(Path(uri).resolve()))
    )
    if not path.endswith(".json"):
        table = schema.to_official(pq.read_table(path, filesystem=fs), n_dims)
        rows, ids = table.to_pylist(), table.column("example_id").to_pylist()
    else:
        with fs.open_input_stream(path) as stream:
            try:
                rows = json.loads(stream.read())
            except json.JSONDecodeError as err:
                raise ValueError(f"{uri}: not a JSON benchmark file ({err})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{uri}: an official benchmark file is a JSON list of examples")
        ids = [f"{PurePosixPath(path).stem}-{i}" for i in range(len(rows))]
    examples, rejected = [], []
    for example_id, row in zip(ids, rows):
        try:
            examples.append(to_example(example_id, row, n_dims))
        except ValueError as err:
            rejected.append({"example_id": example_id, "reason": str(err), "row": json.dumps(row, default=str)[:2000]})
    return examples, rejected


def to_example(example_id: str, row, n_dims: int) -> Example:
    """Validate one benchmark row; ValueError names what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("not_an_object")
    for key in (schema.PROMPT, schema.CHOSEN, schema.REJECTED):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"missing_{key}")
    if row[schema.CHOSEN] == row[schema.REJECTED]:
        raise ValueError("chosen_equals_rejected")

    def direction(value, where: str) -> tuple[float, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != n_dims or any(v not in (0, 0.5, 1) for v in value):
            raise ValueError(f"bad_direction_{where}")
        return tuple(float(v) for v in value)

    def items(key: str, fields: tuple[str, ...]) -> tuple[dict, ...]:
        value = row.get(key) or []
        if not isinstance(value, list):
            raise ValueError(f"bad_{key}")
        out = []
        for item in value:
            if not isinstance(item, dict) or any(not isinstance(item.get(f), str) for f in fields):
                raise ValueError(f"bad_item_{'ugc' if key == schema.UGC else 'pair'}")
            out.append({**{f: item[f] for f in fields}, "direction": direction(item.get(schema.DIRECTION), "item")})
        return tuple(out)

    demographic = row.get(schema.DEMOGRAPHIC) or ""
    profile = row.get("profile")
    if not isinstance(demographic, str) or (profile is not None and not isinstance(profile, str)):
        raise ValueError("bad_persona_text")
    return Example(
        example_id=example_id,
        prompt=row[schema.PROMPT],
        chosen=row[schema.CHOSEN],
        rejected=row[schema.REJECTED],
        ugc=items(schema.UGC, ("prompt", "comment")),
        pairs=items(schema.PAIR, ("prompt", "chosen", "rejected")),
        demographic=demographic,
        profile=profile,
        gold=direction(row.get(schema.DIRECTION), "target"),
    )


def variant(example: Example, persona: str, history: int | None, seed: int = 0) -> Variant:
    """The persona of one type, cut to `history` items drawn seeded from what the example has
    (for `all`, from its UGC and PAIR items together; the demographic text is not an item)."""
    ugc = example.ugc if persona in ("ugc", "all") else ()
    pairs = example.pairs if persona in ("pair", "all") else ()
    demographic = example.demographic if persona in ("demo", "all") else ""
    if history is not None:
        pool = [("ugc", item) for item in ugc] + [("pair", item) for item in pairs]
        rng = seeded_rng("eval-history", seed, example.example_id, persona, history)
        keep = sorted(rng.permutation(len(pool))[:history])
        ugc = tuple(pool[i][1] for i in keep if pool[i][0] == "ugc")
        pairs = tuple(pool[i][1] for i in keep if pool[i][0] == "pair")
    return Variant(example, persona, history, False, tuple(ugc), tuple(pairs), demographic)


def reverse(v: Variant, space: PreferenceSpace = SPACE) -> Variant | None:
    """Table 5: y_w and y_l swapped in the target and in every PAIR item, all directions
    flipped, and the profile text rewritten with the opposite labels. UGC comments and the
    demographic text cannot be reversed, so they are left out; a variant with nothing
    else left has no reversed counterpart (None)."""
    if not v.pairs:
        return None
    e = v.example
    swapped = tuple(
        {**p, "chosen": p["rejected"], "rejected": p["chosen"], "direction": flip_direction(p["direction"])}
        for p in v.pairs
    )
    profile = None if e.profile is None else space.describe_direction(flip_direction(space.parse_profile(e.profile)))
    example = replace(
        e,
        chosen=e.rejected,
        rejected=e.chosen,
        pairs=swapped,
        ugc=(),
        demographic="",
        profile=profile,
        gold=flip_direction(e.gold),
    )
    return replace(v, example=example, reversed=True, ugc=(), pairs=swapped, demographic="")


def item_directions(v: Variant) -> list[tuple[float, ...] | None]:
    """The directions the variant's persona items carry (None where an item has none)."""
    return [item["direction"] for item in v.ugc + v.pairs]


def profile_direction(
    v: Variant, source: str, inferred: dict[str, list[float]] | None = None, space: PreferenceSpace = SPACE
) -> tuple[str, list[float] | None]:
    """(source used, P~) for PBA. Sources: `field` the file's profile text; `gold` the target's
    own direction (Table 2's "Golden P~"); `items` the directions stored on the persona items,
    aggregated (Appendix B.1); `infer` the directions an LLM annotated (`inferred`, by row id);
    `auto` the first of field, items, infer that the variant has."""
    e = v.example
    if source == "auto":
        if e.profile is not None:
            source = "field"
        elif item_directions(v) and all(d is not None for d in item_directions(v)) and not v.demographic:
            source = "items"
        else:
            source = "infer"
    if source == "field":
        if e.profile is None:
            raise ValueError(f"{e.example_id}: profile source 'field' but the file has no `profile`")
        return source, space.parse_profile(e.profile)
    if source == "gold":
        if e.gold is None:
            raise ValueError(f"{e.example_id}: profile source 'gold' but the file has no {schema.DIRECTION!r}")
        return source, list(e.gold)
    if source == "items":
        directions = item_directions(v)
        if any(d is None for d in directions):
            raise ValueError(f"{e.example_id}: profile source 'items' but some persona items carry no direction")
        return source, space.aggregate_directions(directions) if directions else None
    if source == "infer":
        return source, (inferred or {}).get(v.row_id)
    raise ValueError(f"unknown profile source {source!r}")


def eval_prompt(
    v: Variant,
    method: str,
    tokenizer,
    templates: prompts.PromptTemplates,
    profile: list[float] | None,
    space: PreferenceSpace = SPACE,
) -> str:
    """The method's prompt for the variant (the formats the models were trained on)."""
    e = v.example
    if method == "ica":
        return prompts.ica_prompt(tokenizer, templates, e.prompt, list(v.ugc), list(v.pairs), v.demographic)
    if method == "pba":
        return prompts.pba_prompt(tokenizer, templates, e.prompt, space.describe_direction(profile) if profile else "")
    raise ValueError(f"unknown method {method!r}: use 'ica' or 'pba'")


def calibration(pairs: list[tuple[list[float], list[float]]]) -> dict:
    """Table 12: per category (positive / negative / neutral), precision and recall of the
    inferred P~ against the gold direction, over every dimension of every (inferred, gold)."""
    out = {}
    for name, value in (("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)):
        predicted = sum(p == value for inferred, _ in pairs for p in inferred)
        actual = sum(g == value for _, gold in pairs for g in gold)
        hit = sum(p == g == value for inferred, gold in pairs for p, g in zip(inferred, gold))
        out[name] = {
            "precision": hit / predicted if predicted else None,
            "recall": hit / actual if actual else None,
            "predicted": predicted,
            "gold": actual,
        }
    return out


def build_variants(examples: list[Example], config: EvalConfig) -> list[Variant]:
    """Every (persona type, history size) the example has, each followed by its reversal."""
    out = []
    for e in examples:
        for persona in config.personas:
            if not e.has(persona):
                continue
            for history in config.history_sizes:
                v = variant(e, persona, history, config.seed)
                out.append(v)
                flipped = reverse(v) if config.reversal else None
                if flipped is not None:
                    out.append(flipped)
    return out


def infer_profiles(
    variants: list[Variant],
    engine_config: EngineConfig,
    model: str,
    templates: prompts.PromptTemplates,
    batch: int,
    space: PreferenceSpace = SPACE,
) -> dict:
    """P~ inferred by an off-the-shelf LLM (paper §5): every persona item annotated on the
    space with the annotation prompt, as in dataset construction (a UGC comment or the
    demographic text against the median, a PAIR item as chosen vs rejected), then aggregated."""
    from transformers import AutoTokenizer  # lazy: runs in a Ray task, with the engine

    def texts(v: Variant) -> list[tuple[str, str]]:
        out = [(u["prompt"], u["comment"]) for u in v.ugc]
        out += [(p["prompt"], side) for p in v.pairs for side in (p["chosen"], p["rejected"])]
        return out + ([(v.example.prompt, v.demographic)] if v.demographic else [])

    unique = list(dict.fromkeys(t for v in variants for t in texts(v)))
    tokenizer = AutoTokenizer.from_pretrained(model)
    engine, bank = make_engine(engine_config, model, tokenizer), QuestionBank(tokenizer, templates, space)
    levels = {}
    for start in tqdm(range(0, len(unique), batch), desc="infer persona directions", unit="batch"):
        chunk = unique[start : start + batch]
        labelled = label_batch(engine, bank, [p for p, _ in chunk], [r for _, r in chunk])
        levels.update(zip(chunk, labelled["levels"]))
    profiles = {}
    for v in variants:
        vectors = [level_to_direction(levels[(u["prompt"], u["comment"])]) for u in v.ugc]
        vectors += [
            compare_levels(levels[(p["prompt"], p["chosen"])], levels[(p["prompt"], p["rejected"])]) for p in v.pairs
        ]
        if v.demographic:
            vectors.append(level_to_direction(levels[(v.example.prompt, v.demographic)]))
        if vectors:
            profiles[v.row_id] = aggregate_directions(vectors)
    return profiles


def read_examples(benchmark: str, config: EvalConfig, out_dir: Path, space: PreferenceSpace = SPACE):
    """(the first `max_examples` examples, how many rows were rejected: written to `_rejected`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, rejected = load_benchmark(benchmark, len(space))
    write_rejected(
        out_dir,
        "evaluate",
        [{"reason": r["reason"], "raw": r["row"], "location": f"{benchmark}#{r['example_id']}"} for r in rejected],
    )
    return examples[: config.max_examples] if config.max_examples is not None else examples, len(rejected)


def variant_table(
    variants: list[Variant],
    method: str,
    config: EvalConfig,
    tokenizer,
    templates: prompts.PromptTemplates,
    annotator: Callable[[], str],
    space: PreferenceSpace = SPACE,
):
    """(the variants with their prompts in the method's format, (inferred P~, gold) pairs for
    calibration). PBA's P~ comes from `config.profile_source`; what must be inferred is
    annotated in a Ray task holding `direction_num_gpus` GPUs, by `direction_engine.model`
    or else the model `annotator()` returns (called only then: it may have to be built)."""
    profiles, calibration_pairs, sources = {}, [], {}
    if method == "pba":
        needs_inference = [v for v in variants if profile_direction(v, config.profile_source)[0] == "infer"]
        inferred = {}
        if needs_inference:
            task = ray.remote(num_gpus=fit_local(1, config.direction_num_gpus)[1])(infer_profiles)
            inferred = ray.get(
                task.remote(
                    needs_inference,
                    config.direction_engine,
                    resolve_local(config.direction_engine.model or annotator()),
                    templates,
                    config.direction_batch,
                    space,
                )
            )
        for v in variants:
            sources[v.row_id], profiles[v.row_id] = profile_direction(v, config.profile_source, inferred, space)
            inferred_p = sources[v.row_id] != "gold" and profiles[v.row_id] is not None
            if inferred_p and v.example.gold is not None and not v.reversed:
                calibration_pairs.append((profiles[v.row_id], list(v.example.gold)))
    table = pa.Table.from_pylist(
        [
            {
                "row_id": v.row_id,
                "example_id": v.example.example_id,
                "persona": v.persona,
                "history": v.history,
                "reversed": v.reversed,
                "profile_source": sources.get(v.row_id),
                "profile": space.describe_direction(profiles[v.row_id]) if profiles.get(v.row_id) else None,
                "prompt_text": eval_prompt(v, method, tokenizer, templates, profiles.get(v.row_id), space),
                "chosen": v.example.chosen,
                "rejected": v.example.rejected,
            }
            for v in variants
        ],
        schema=VARIANTS_SCHEMA,
    )
    return table, calibration_pairs
