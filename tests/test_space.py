"""Tests for the preference space: dimension data, levels, profile text and aggregation."""

import dataclasses
import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from alignx_ray.common import space as sp
from alignx_ray.common.space import (
    CANNOT_REFLECT,
    DIMENSIONS,
    SPACE,
    Dimension,
    PreferenceSpace,
    aggregate_directions,
    check_official,
    compare_levels,
    describe_direction,
    direction_bytes,
    level_direction_bytes,
    level_to_direction,
    parse_profile,
)

COMMA_LABEL_DIMS = [i for i, d in enumerate(DIMENSIONS) if ", " in d.positive or ", " in d.negative]


def read_official_labels(official_dir):
    rows = []
    for line in (official_dir / "profile_labels_90.tsv").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            index, positive, negative = line.split("\t")
            rows.append((int(index), positive, negative))
    return rows


STOPWORDS = {"a", "about", "and", "at", "for", "of", "or", "the", "to"}


def words(text):
    return set(re.findall(r"[a-z]+", text.lower())) - STOPWORDS


def make_dimension(name, positive, negative):
    return Dimension(
        name=name,
        group="psychological",
        question=f"What does this comment suggest about the commenter's {name.lower()}?",
        options=(positive, negative, CANNOT_REFLECT),
        positive=positive,
        negative=negative,
    )


HUMOR = make_dimension("Humor", "Prefers witty responses", "Prefers serious responses")
PRAGMATISM = make_dimension("Pragmatism", "Prefers practical advice", "Prefers theoretical discussion")


# --- dimension data -------------------------------------------------------------------


def test_every_record_is_complete():
    assert len(DIMENSIONS) == len(SPACE) == sp.OFFICIAL_D == 90
    for dim in DIMENSIONS:
        assert dim.name and dim.positive and dim.negative
        assert "?" in dim.question
        assert len(dim.options) == 3 and dim.options[2] == "Comments alone cannot reflect"
        assert dim.options[0] != dim.options[1]
        assert dim.group in {"psychological", "alignment", "platform"}


def test_labels_equal_official_table(official_dir):
    rows = read_official_labels(official_dir)
    assert [row[0] for row in rows] == list(range(90))
    assert [(d.positive, d.negative) for d in DIMENSIONS] == [(p, n) for _, p, n in rows]


def test_first_option_is_the_positive_pole():
    """Words that tell the two options apart must never point at the opposite label."""
    for dim in DIMENSIONS:
        positive_only = words(dim.options[0]) - words(dim.options[1])
        negative_only = words(dim.options[1]) - words(dim.options[0])
        assert not positive_only & words(dim.negative), dim.name
        assert not negative_only & words(dim.positive), dim.name
        assert positive_only & words(dim.positive) or negative_only & words(dim.negative), dim.name


def test_groups_follow_table_6():
    groups = [d.group for d in DIMENSIONS]
    assert Counter(groups) == {"psychological": 40, "alignment": 7, "platform": 43}
    assert groups == ["psychological"] * 40 + ["alignment"] * 7 + ["platform"] * 43


def test_intensity_questions_use_prompt_form():
    neuroticism = DIMENSIONS[2]
    assert neuroticism.name == "Degree of Neuroticism in the Big Five personality traits"
    assert neuroticism.question == (
        "What does this comment suggest about the commenter's Neuroticism in the Big Five personality traits?"
    )
    assert neuroticism.options[:2] == ("High Neuroticism", "Low Neuroticism")
    assert DIMENSIONS[14].options[:2] == (
        "Superficial interaction (casual, stress-free chat)",
        "Deep interaction (discussing interests, emotional topics, etc.)",
    )
    assert DIMENSIONS[16].options[:2] == ("Concise", "Detailed")
    assert len({d.question for d in DIMENSIONS}) == 90


def test_demo_dimensions_match_prompt_2():
    demo = SPACE.demo_dimensions()
    assert len(demo) == 47
    assert [d.name for d in demo] == list(SPACE.names[:47])
    assert demo[0].demo_labels == ("Young", "Older")
    assert demo[3].demo_labels == ("High", "Low")
    assert demo[15].demo_labels == ("Direct communication", "Avoidance, mediation, compromise")
    assert [d.demo_labels for d in demo[17:20]] == [("Strong", "Mild")] * 3
    assert [d.demo_labels for d in demo[23:47]] == [("Strong", "Indifferent")] * 24
    assert all(d.keyword is None for d in demo)


def test_keyword_dimensions_are_the_platform_tags():
    tags = SPACE.keyword_dimensions()
    assert len(tags) == 43
    assert tags == tuple(d for d in DIMENSIONS if d.group == "platform")
    for tag in tags:
        assert tag.name == tag.keyword and tag.demo_labels is None
        assert tag.question == (f'Does this comment indicate that the commenter likes or dislikes "{tag.keyword}"?')
        assert tag.options[:2] == ("Likes", "Dislikes")
        assert (tag.positive, tag.negative) == (f"Likes {tag.keyword}", f"Dislikes {tag.keyword}")


# --- levels ---------------------------------------------------------------------------


def test_option_levels_put_cannot_reflect_at_the_median():
    assert sp.L == 3
    assert sp.LEVEL_MEDIAN == (sp.L + 1) / 2
    assert sp.OPTION_TO_LEVEL == {1: sp.LEVEL_HIGH, 2: sp.LEVEL_LOW, 3: sp.LEVEL_MEDIAN}
    assert (sp.LEVEL_HIGH, sp.LEVEL_MEDIAN, sp.LEVEL_LOW) == (3, 2, 1)


def test_level_to_direction_is_vectorised():
    levels = np.array([[1, 2, 3], [3, 3, 1]])
    expected = np.array([[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(level_to_direction(levels), expected)


def test_level_direction_bytes_equal_the_float_path():
    levels = np.random.default_rng(0).integers(1, 4, size=(500, 90)).astype(np.uint8)
    np.testing.assert_array_equal(level_direction_bytes(levels), direction_bytes(level_to_direction(levels)))
    assert level_direction_bytes(levels).dtype == np.uint8


def test_compare_levels_marks_the_stronger_response_positive():
    directions = compare_levels([3, 2, 1, 2], [1, 2, 3, 3])
    np.testing.assert_array_equal(directions, [1.0, 0.5, 0.0, 0.0])
    assert directions.dtype == float


# --- profile text ---------------------------------------------------------------------


def test_official_profiles_round_trip(official_dir):
    path = official_dir / "psoups_friendly_unfriendly.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    assert len(records) == 600
    for record in records:
        direction = parse_profile(record["profile"])
        assert describe_direction(direction) == record["profile"]


def test_random_directions_round_trip():
    rng = np.random.default_rng(1234)
    for trial in range(300):
        direction = rng.choice([0.0, 0.5, 1.0], size=90, p=[0.2, 0.6, 0.2]).tolist()
        if trial % 2 == 0:
            for index in COMMA_LABEL_DIMS:
                direction[index] = float(rng.choice([0.0, 1.0]))
        text = describe_direction(direction)
        assert parse_profile(text) == direction
        assert describe_direction(parse_profile(text)) == text


def test_comma_labels_parse_as_one_dimension():
    assert {14, 15, 22} <= set(COMMA_LABEL_DIMS)
    text = "Prefers avoidance, mediation, compromise to handle conflict, Detailed communication style"
    direction = parse_profile(text)
    assert direction[15] == 0.0 and direction[16] == 0.0
    assert sum(value != 0.5 for value in direction) == 2


def test_parser_backtracks_out_of_a_wrong_early_match():
    space = PreferenceSpace(
        [make_dimension("A", "a", "not a"), make_dimension("B", "a, b", "not b"), make_dimension("C", "c", "not c")]
    )
    assert space.parse_profile("a, b, c") == [0.5, 1.0, 1.0]
    assert space.parse_profile("a, c") == [1.0, 0.5, 1.0]


def test_empty_profile_is_all_neutral():
    assert parse_profile("") == [0.5] * 90
    assert describe_direction([0.5] * 90) == ""


@pytest.mark.parametrize(
    "text, remainder",
    [
        ("Young, Likes knitting", "Likes knitting"),
        ("Likes fashion, Young", "Young"),  # labels must follow space order
        ("Young, Young", "Young"),
        ("Young, ", "Young, "),
        ("Young,Female", "Young,Female"),
    ],
)
def test_unparseable_profile_names_the_remainder(text, remainder):
    with pytest.raises(ValueError) as error:
        parse_profile(text)
    assert repr(remainder) in str(error.value)


def test_describe_uses_positive_and_negative_labels_in_space_order():
    direction = [0.5] * 90
    direction[89], direction[0], direction[2] = 1.0, 0.0, 1.0
    assert describe_direction(np.array(direction)) == "Older, High Neuroticism, Likes fashion"


@pytest.mark.parametrize("bad", [[0.5] * 89, [0.5] * 91, [0.3] + [0.5] * 89, [math.nan] + [0.5] * 89])
def test_describe_rejects_bad_vectors(bad):
    with pytest.raises(ValueError):
        describe_direction(bad)


# --- aggregation ----------------------------------------------------------------------


def test_aggregate_applies_inclusive_thresholds():
    vectors = [
        [1.0, 0.0, 1.0, 1.0],
        [0.5, 0.5, 1.0, 1.0],
        [0.5, 0.5, 0.0, 1.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.5, 0.5, 0.5, 0.5],
    ]
    # means: 0.6, 0.4, 0.5, 0.7
    assert aggregate_directions(vectors) == [1.0, 0.0, 0.5, 1.0]
    assert aggregate_directions(vectors, t1=0.65, t2=0.35) == [0.5, 0.5, 0.5, 1.0]


def test_single_vector_aggregates_to_itself():
    direction = [1.0, 0.5, 0.0, 0.0, 1.0]
    assert aggregate_directions([direction]) == direction


def test_all_neutral_result_keeps_the_most_extreme_dimension():
    vectors = [[1.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.5, 0.5]]  # means 0.625, 0.25
    assert aggregate_directions(vectors, t1=0.9, t2=0.1) == [0.5, 0.0]


def test_all_neutral_fallback_breaks_ties_by_lowest_index():
    strict = {"t1": 0.9, "t2": 0.1}
    assert aggregate_directions([[0.5, 0.0, 1.0], [0.5, 0.5, 0.5]], **strict) == [0.5, 0.0, 0.5]
    assert aggregate_directions([[0.5, 1.0, 0.0], [0.5, 0.5, 0.5]], **strict) == [0.5, 1.0, 0.5]


def test_exactly_neutral_means_stay_neutral():
    assert aggregate_directions([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "vectors, thresholds",
    [([], {}), ([[1.0, 0.0], [1.0]], {}), ([[1.0]], {"t1": 0.4, "t2": 0.6})],
)
def test_aggregate_rejects_bad_input(vectors, thresholds):
    with pytest.raises(ValueError):
        aggregate_directions(vectors, **thresholds)


# --- extension ------------------------------------------------------------------------


def test_extend_adds_new_dimensions_without_touching_the_original():
    extended = SPACE.extend([HUMOR, PRAGMATISM])
    assert len(extended) == 92 and len(SPACE) == 90
    assert extended.names[-2:] == ("Humor", "Pragmatism")
    assert extended[:90] == SPACE[:]

    direction = [0.5] * 92
    direction[15], direction[90], direction[91] = 0.0, 1.0, 0.0
    text = describe_direction(direction, space=extended)
    assert text.endswith("Prefers witty responses, Prefers theoretical discussion")
    assert parse_profile(text, space=extended) == direction
    with pytest.raises(ValueError):
        parse_profile(text)
    with pytest.raises(ValueError):
        check_official(direction)
    check_official(direction[:90])


def test_from_records_builds_an_equivalent_space():
    records = [dataclasses.asdict(d) for d in DIMENSIONS[:5]]
    rebuilt = PreferenceSpace.from_records(records)
    assert rebuilt[:] == DIMENSIONS[:5]
    assert rebuilt[0].demo_labels == ("Young", "Older")


@pytest.mark.parametrize(
    "new_dimension, message",
    [
        (make_dimension("Humor", "Likes humor", "Prefers serious responses"), "duplicate label"),
        (make_dimension("Humor", "Prefers wit", "Prefers wit"), "duplicate label"),
        (make_dimension("humor", "Prefers jokes", "Prefers gravity"), "duplicate dimension name"),
    ],
)
def test_extend_rejects_duplicates(new_dimension, message):
    with pytest.raises(ValueError, match=message):
        SPACE.extend([new_dimension])


def test_dimension_requires_cannot_reflect_option():
    with pytest.raises(ValueError):
        dataclasses.replace(HUMOR, options=("Witty", "Serious", "Unclear"))


def test_space_and_dimensions_are_immutable():
    with pytest.raises(AttributeError):
        SPACE.extra = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        DIMENSIONS[0].positive = "Old"


def test_space_pickles_for_ray_actors():
    import pickle

    from alignx_ray.common.space import SPACE

    restored = pickle.loads(pickle.dumps(SPACE))
    assert restored.names == SPACE.names and restored[1].demo_labels == SPACE[1].demo_labels
