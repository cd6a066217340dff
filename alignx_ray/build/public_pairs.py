"""Universal-value pairs: PKU-SafeRLHF, UltraFeedback and HelpSteer2 rows -> AlignX preference pairs.

AlignX mixes its Reddit pairs with pairs from alignment datasets "to maintain universal value
alignment capabilities" (paper §4, Table 1). These datasets already say which response is better
and on what, so a pair and its direction come from their labels, not from intensity annotation:
1.0 where the chosen response is rated higher on a dimension, 0.0 where lower, 0.5 where equal,
unrated or not labelled by the dataset.

Dimension mapping. Table 1 names the labels taken from each dataset; Appendix A.1 says they became
the seven alignment dimensions "harmlessness, instruction-following, honesty, truthfulness,
helpfulness, coherence, and complexity" ("Degree of concern for the ... of the statement"):
  PKU-SafeRLHF   safety -> harmlessness.
  UltraFeedback  helpfulness, honesty, instruction_following, truthfulness -> the same-named ones.
  HelpSteer2     helpfulness, coherence, complexity -> the same-named ones; correctness (factual
                 accuracy) -> truthfulness, the closest of the seven; verbosity -> none. The seven
                 have no verbosity, and the paper ties no other dimension to it ("Communication
                 style in social settings: more concise or detailed" is a trait of a person's social
                 talk, not a rating of a response), so verbosity is validated like the other ratings
                 but never written into a direction: `UniversalResult.unmapped` counts the pairs
                 that differ on it.

Accounting: every input row (a file line or parquet row) is either used by a pair or in the
rejected table with a reason, so input rows == used_rows + rejected rows. A PKU-SafeRLHF or
UltraFeedback row gives at most one pair. HelpSteer2 has one row per response and several rows
per prompt: a prompt's pair uses two rows, its other rows are rejected as `not_selected`, and when
the prompt gives no pair every one of its rows is rejected with the reason why.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, combinations

import pyarrow as pa
import pyarrow.compute as pc

from alignx_ray.build.ingest import reject, text_problem
from alignx_ray.build.readers import Located, read_records
from alignx_ray.common.schema import PAIRS_SCHEMA, REJECTED_SCHEMA
from alignx_ray.common.space import NEUTRAL, SPACE, PreferenceSpace, compare_levels

STAGE = "universal"
PKU_SAFERLHF, ULTRAFEEDBACK, HELPSTEER2 = "pku_saferlhf", "ultrafeedback", "helpsteer2"


def concern(value: str) -> str:
    """Name of the space's alignment dimension for one universal value."""
    return f"Degree of concern for the {value} of the statement"


# Dataset label -> dimension name; None: the space has no dimension for that label.
PKU_SAFERLHF_DIMENSIONS = {"safety": concern("harmlessness")}
ULTRAFEEDBACK_DIMENSIONS = {
    "helpfulness": concern("helpfulness"),
    "honesty": concern("honesty"),
    "instruction_following": concern("instruction-following"),
    "truthfulness": concern("truthfulness"),
}
HELPSTEER2_DIMENSIONS = {
    "helpfulness": concern("helpfulness"),
    "correctness": concern("truthfulness"),
    "coherence": concern("coherence"),
    "complexity": concern("complexity"),
    "verbosity": None,
}
ULTRAFEEDBACK_RATINGS = range(1, 6)
HELPSTEER2_RATINGS = range(0, 5)
NOT_RATED = "N/A"

Ratings = dict[str, int | None]  # dataset label -> rating, None when unrated


@dataclass
class UniversalResult:
    """Pairs (PAIRS_SCHEMA rows without the columns these datasets cannot fill), rejected rows
    (REJECTED_SCHEMA rows) and the figures that account for every input row.

    used_rows: input rows whose responses are in a pair (one per PKU-SafeRLHF or UltraFeedback
        pair, two per HelpSteer2 pair).
    unmapped: per dataset label without a dimension, how many pairs differ on it.
    """

    pairs: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    used_rows: int = 0
    unmapped: Counter = field(default_factory=Counter)


class Unusable(Exception):
    """A row that cannot give a pair: the rejected table's reason and detail."""

    def __init__(self, reason: str, detail: str, prompt: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.prompt = reason, detail, prompt


def digest(*texts: str) -> str:
    """Content hash behind every id, so ids do not depend on row order or file layout."""
    return hashlib.sha256("\x1f".join(texts).encode("utf-8")).hexdigest()[:16]


def same_text(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def mapped_dimensions(labels: dict[str, str | None], space: PreferenceSpace) -> dict[str, int]:
    """Dataset label -> index in `space` of its dimension, for the labels that have one."""
    missing = [name for name in labels.values() if name is not None and name not in space.names]
    if missing:
        raise ValueError(f"the preference space has no dimension {missing}")
    return {label: space.names.index(name) for label, name in labels.items() if name is not None}


class PairBuilder:
    """Collects the pairs and rejected rows of one source, with directions over `space`."""

    def __init__(self, source: str, labels: dict[str, str | None], space: PreferenceSpace):
        self.source = source
        self.indices = mapped_dimensions(labels, space)
        self.unmapped_labels = [label for label, name in labels.items() if name is None]
        self.size = len(space)
        self.pair_ids: set[str] = set()
        self.result = UniversalResult()

    def thread_id(self, prompt: str) -> str:
        return f"{self.source}-{digest(prompt)}"

    def direction(self, chosen: Ratings, rejected: Ratings) -> list[float]:
        vector = [NEUTRAL] * self.size
        for label, index in self.indices.items():
            if chosen.get(label) is not None and rejected.get(label) is not None:
                vector[index] = float(compare_levels(chosen[label], rejected[label]))
        return vector

    def add_pair(
        self,
        rows: list[Located],
        prompt: str,
        chosen: str,
        rejected: str,
        chosen_ratings: Ratings,
        rejected_ratings: Ratings,
    ) -> None:
        """One pair from `rows`; a pair already made from earlier rows rejects them instead."""
        thread_id = self.thread_id(prompt)
        pair_id = f"{self.source}-{digest(prompt, chosen, rejected)}"
        if pair_id in self.pair_ids:
            for row in rows:
                self.reject(Unusable("duplicate_pair", f"pair {pair_id} was made from an earlier row", prompt), row)
            return
        self.pair_ids.add(pair_id)
        self.result.pairs.append(
            {
                "pair_id": pair_id,
                "thread_id": thread_id,
                "prompt": prompt,
                "chosen_id": f"{thread_id}-{digest(chosen)}",
                "rejected_id": f"{thread_id}-{digest(rejected)}",
                "chosen": chosen,
                "rejected": rejected,
                "direction": self.direction(chosen_ratings, rejected_ratings),
                "source": self.source,
            }
        )
        self.result.used_rows += len(rows)
        for label in self.unmapped_labels:
            if chosen_ratings.get(label) != rejected_ratings.get(label):
                self.result.unmapped[label] += 1

    def reject(self, problem: Unusable, item: Located) -> None:
        thread_id = None if problem.prompt is None else self.thread_id(problem.prompt)
        self.result.rejected.append({**reject(problem.reason, problem.detail, item, thread_id), "stage": STAGE})


def record_of(item: Located) -> dict:
    if item.error:
        raise Unusable(*item.error)
    if not isinstance(item.record, dict):
        raise Unusable("not_an_object", f"row is {type(item.record).__name__}")
    return item.record


def required_text(record: dict, name: str, prompt: str | None = None, where: str = "") -> str:
    problem = text_problem(record.get(name), name)
    if problem:
        raise Unusable(problem[0], where + problem[1], prompt)
    return record[name]


def widest_pair(texts: list[str], gap: Callable[[int, int], int | None]) -> tuple[int, int] | None:
    """The (i, j), i < j, of distinct texts with the largest nonzero |gap|; the first one on ties."""
    best, widest = None, 0
    for i, j in combinations(range(len(texts)), 2):
        g = gap(i, j)
        if g and abs(g) > widest and not same_text(texts[i], texts[j]):
            best, widest = (i, j), abs(g)
    return best


def no_pair_reason(count: int, gaps: Iterable[Callable[[int, int], int | None]]) -> tuple[str, str]:
    """Why widest_pair found nothing: ratings that differ only between identical texts, or not at all."""
    if any(gap(i, j) for gap in gaps for i, j in combinations(range(count), 2)):
        return "equal_texts", "the only responses rated differently have the same text"
    return "no_preference", "no rating tells the responses apart"


def rating_gap(ratings: list[Ratings], label: str) -> Callable[[int, int], int | None]:
    def gap(i: int, j: int) -> int | None:
        a, b = ratings[i].get(label), ratings[j].get(label)
        return None if a is None or b is None else a - b

    return gap


# PKU-SafeRLHF ---------------------------------------------------------------------------------


def pku_saferlhf_row(item: Located, builder: PairBuilder) -> None:
    """The safer response is chosen, from `safer_response_id`, or from the safety flags when it is
    missing and exactly one response is safe. The flags contradicting the id rejects the row.
    `better_response_id` (helpfulness) is not used: Table 1 takes only safety from this dataset.
    """
    record = record_of(item)
    prompt = required_text(record, "prompt")
    responses = [required_text(record, f"response_{k}", prompt) for k in (0, 1)]
    if same_text(*responses):
        raise Unusable("equal_texts", "response_0 and response_1 have the same text", prompt)
    safe = [record.get(f"is_response_{k}_safe") for k in (0, 1)]
    if any(flag is not None and not isinstance(flag, bool) for flag in safe):
        raise Unusable("bad_safety_label", f"is_response_0/1_safe are {safe!r}, expected booleans", prompt)
    safer = record.get("safer_response_id")
    if safer is not None and (not isinstance(safer, int) or isinstance(safer, bool) or safer not in (0, 1)):
        raise Unusable("bad_safer_response_id", f"safer_response_id is {safer!r}, expected 0 or 1", prompt)
    flags_differ = None not in safe and safe[0] != safe[1]
    if safer is None:
        if not flags_differ:
            raise Unusable("no_preference", "no safer_response_id and the safety flags do not differ", prompt)
        safer = safe.index(True)
    elif flags_differ and not safe[safer]:
        raise Unusable("contradictory_safety", f"safer_response_id {safer} is the response flagged unsafe", prompt)
    builder.add_pair([item], prompt, responses[safer], responses[1 - safer], {"safety": 1}, {"safety": 0})


# UltraFeedback ----------------------------------------------------------------------------------


def ultrafeedback_rating(annotations: dict, aspect: str, where: str, prompt: str) -> int | None:
    entry = annotations.get(aspect)
    if not isinstance(entry, dict) or entry.get("Rating") is None:
        raise Unusable("missing_rating", f"{where}no {aspect} Rating", prompt)
    rating = entry["Rating"]
    if rating == NOT_RATED:
        return None
    value = int(rating) if isinstance(rating, str) and rating.isascii() and rating.isdigit() else rating
    if not isinstance(value, int) or isinstance(value, bool) or value not in ULTRAFEEDBACK_RATINGS:
        raise Unusable("bad_rating", f"{where}{aspect} Rating {rating!r} is not 1-5 or {NOT_RATED}", prompt)
    return value


def ultrafeedback_completions(record: dict, prompt: str) -> tuple[list[str], list[Ratings]]:
    """Texts and ratings of every completion; one unusable completion rejects the whole row."""
    completions = record.get("completions")
    if completions is None or completions == []:
        raise Unusable("missing_completions", "no completions", prompt)
    if not isinstance(completions, list):
        raise Unusable("bad_type_completions", f"completions is {type(completions).__name__}", prompt)
    if len(completions) < 2:
        raise Unusable("too_few_completions", "a pair needs at least 2 completions", prompt)
    texts, ratings = [], []
    for j, completion in enumerate(completions):
        where = f"completions[{j}]: "
        if not isinstance(completion, dict):
            raise Unusable("bad_type_completion", f"{where}is {type(completion).__name__}", prompt)
        texts.append(required_text(completion, "response", prompt, where))
        annotations = completion.get("annotations")
        if not isinstance(annotations, dict):
            raise Unusable("missing_annotations", f"{where}annotations are {annotations!r}", prompt)
        ratings.append(
            {aspect: ultrafeedback_rating(annotations, aspect, where, prompt) for aspect in ULTRAFEEDBACK_DIMENSIONS}
        )
    return texts, ratings


def ultrafeedback_row(item: Located, builder: PairBuilder) -> None:
    """One pair per instruction, chosen in three steps:

    1. each aspect (helpfulness, honesty, instruction_following, truthfulness, in that order)
       nominates the pair of distinct completions with its largest rating gap, the lowest (i, j)
       on ties; "N/A" ratings give no gap;
    2. of the nominees, the pair with the largest |summed gap| (rating of i minus rating of j,
       summed over the aspects both are rated on) wins, the earliest nominee on ties;
    3. the completion with the higher summed rating is chosen; when the sums are equal, the one
       rated higher on the first aspect (in the order above) where they differ.
    """
    record = record_of(item)
    prompt = required_text(record, "instruction")
    texts, ratings = ultrafeedback_completions(record, prompt)
    gaps = [rating_gap(ratings, aspect) for aspect in ULTRAFEEDBACK_DIMENSIONS]
    nominees: list[tuple[int, int]] = []
    for gap in gaps:
        pair = widest_pair(texts, gap)
        if pair and pair not in nominees:
            nominees.append(pair)
    if not nominees:
        raise Unusable(*no_pair_reason(len(texts), gaps), prompt)

    def summed_gap(pair: tuple[int, int]) -> int:
        return sum(g for gap in gaps if (g := gap(*pair)) is not None)

    i, j = max(nominees, key=lambda pair: abs(summed_gap(pair)))
    lead = summed_gap((i, j)) or next(g for gap in gaps if (g := gap(i, j)))
    chosen, rejected = (i, j) if lead > 0 else (j, i)
    builder.add_pair([item], prompt, texts[chosen], texts[rejected], ratings[chosen], ratings[rejected])


# HelpSteer2 -------------------------------------------------------------------------------------


def helpsteer2_ratings(record: dict, prompt: str) -> Ratings:
    ratings = {}
    for label in HELPSTEER2_DIMENSIONS:
        value = record.get(label)
        if value is None:
            raise Unusable("missing_rating", f"no {label}", prompt)
        if not isinstance(value, int) or isinstance(value, bool) or value not in HELPSTEER2_RATINGS:
            raise Unusable("bad_rating", f"{label} is {value!r}, expected an integer 0-4", prompt)
        ratings[label] = value
    return ratings


def helpsteer2_prompt(prompt: str, rows: list[tuple[Located, str, Ratings]], builder: PairBuilder) -> None:
    """One pair per prompt: of its responses with distinct texts, the two with the largest
    helpfulness gap (the lowest (i, j) in input order on ties); the more helpful one is chosen.
    """
    items, texts, ratings = (list(column) for column in zip(*rows))
    if len(rows) < 2:
        problem = Unusable("single_response", "the prompt has only one usable response", prompt)
        builder.reject(problem, items[0])
        return
    helpfulness = rating_gap(ratings, "helpfulness")
    pair = widest_pair(texts, helpfulness)
    if pair is None:
        problem = Unusable(*no_pair_reason(len(texts), [helpfulness]), prompt)
        for item in items:
            builder.reject(problem, item)
        return
    i, j = pair
    chosen, rejected = (i, j) if helpfulness(i, j) > 0 else (j, i)
    builder.add_pair(
        [items[chosen], items[rejected]], prompt, texts[chosen], texts[rejected], ratings[chosen], ratings[rejected]
    )
    for k, item in enumerate(items):
        if k not in pair:
            builder.reject(
                Unusable(
                    "not_selected",
                    f"the prompt's pair is from rows {items[chosen].location} and {items[rejected].location}",
                    prompt,
                ),
                item,
            )


def helpsteer2_rows(items: Iterable[Located], builder: PairBuilder) -> None:
    """Rows are checked one by one, then the usable ones are grouped by their exact prompt text."""
    prompts: dict[str, list[tuple[Located, str, Ratings]]] = {}
    for item in items:
        try:
            record = record_of(item)
            prompt = required_text(record, "prompt")
            response = required_text(record, "response", prompt)
            prompts.setdefault(prompt, []).append((item, response, helpsteer2_ratings(record, prompt)))
        except Unusable as problem:
            builder.reject(problem, item)
    for prompt, rows in prompts.items():
        helpsteer2_prompt(prompt, rows, builder)


def each_row(handle_row: Callable[[Located, PairBuilder], None]):
    def handle(items: Iterable[Located], builder: PairBuilder) -> None:
        for item in items:
            try:
                handle_row(item, builder)
            except Unusable as problem:
                builder.reject(problem, item)

    return handle


SOURCES = {
    PKU_SAFERLHF: (PKU_SAFERLHF_DIMENSIONS, each_row(pku_saferlhf_row)),
    ULTRAFEEDBACK: (ULTRAFEEDBACK_DIMENSIONS, each_row(ultrafeedback_row)),
    HELPSTEER2: (HELPSTEER2_DIMENSIONS, helpsteer2_rows),
}


# A universal pair's id is `<source>-<16 hex digits>` (PairBuilder.add_pair); a Reddit pair's,
# `<chosen response id>><rejected response id>`, always holds a ">", so an example's source
# is known from its id alone, and the released AlignX schema needs no source column.
UNIVERSAL_ID = re.compile(rf"^(?P<source>{'|'.join(SOURCES)})-[0-9a-f]{{16}}$")
FORUM = "forum"  # the source name of every other example (the paper's Reddit)


def source_dimensions(source: str, space: PreferenceSpace = SPACE) -> list[int]:
    """Indices in `space` of the dimensions that `source`'s pairs can be non-neutral on."""
    return sorted(set(mapped_dimensions(SOURCES[source][0], space).values()))


def is_universal(pair_id: str) -> bool:
    return UNIVERSAL_ID.match(pair_id) is not None


def sources_of(ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Each example's source from its id: a universal source's name, else FORUM."""
    return pc.fill_null(pc.struct_field(pc.extract_regex(ids, UNIVERSAL_ID.pattern), "source"), FORUM)


def universal_pairs(items: Iterable[Located], source: str, space: PreferenceSpace = SPACE) -> UniversalResult:
    """The pure core: rows of `source`, in its public schema, -> pairs and rejected rows.

    Directions have len(space) values; the space must hold the dimensions the source maps to.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: expected one of {sorted(SOURCES)}")
    labels, make_pairs = SOURCES[source]
    builder = PairBuilder(source, labels, space)
    make_pairs(items, builder)
    return builder.result


def read_universal(
    path_or_uri: str | Sequence[str], source: str, space: PreferenceSpace = SPACE
) -> tuple[pa.Table, pa.Table]:
    """(pairs, rejected) tables from a file or directory, local or a pyarrow filesystem URI, or
    from several, read in order as one input (a pair made again from a later file is rejected
    as a duplicate; a HelpSteer2 prompt's rows may span files).

    Pairs have the schema of the Reddit pairs (PAIRS_SCHEMA), so both feed the same later
    stages; the intensity levels are null, as these datasets give ratings, not levels. Files
    are read as ingest reads them: parquet, or JSON Lines (`.jsonl`, and `.json` holding one
    object per line).
    """
    paths = [path_or_uri] if isinstance(path_or_uri, str) else path_or_uri
    result = universal_pairs(chain.from_iterable(read_records(path) for path in paths), source, space)
    return (pa.Table.from_pylist(result.pairs, PAIRS_SCHEMA), pa.Table.from_pylist(result.rejected, REJECTED_SCHEMA))
