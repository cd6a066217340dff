"""The dataset build on a real local Ray instance, with the real vLLM engine for P_DEMO."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alignx_rows import example_consistent
from cpu import DEMO, cpu_pool

from alignx_ray.build.assemble import AssembleConfig, run_assemble
from alignx_ray.build.demographics import DemographicsConfig, demographics_batch, parse_demographic, run_demographics
from alignx_ray.build.pairs import run_pairs
from alignx_ray.build.personas import PersonaConfig, consistent, run_personas
from alignx_ray.build.stats import dataset_statistics, directions_from_table, split_statistics
from alignx_ray.common import prompts, schema
from alignx_ray.common.space import SPACE
from alignx_ray.fixtures import synthetic
from alignx_ray.run import BuildConfig


def answer(**overrides) -> str:
    body = {
        "reason": "r",
        "textual persona": "A young woman who paints.",
        "dimension description": {"Age group": "Young", "Occupation": "nurse"},
        "like keywords": "painting, knitting",
        "dislike keywords": "gaming",
    }
    return json.dumps({**body, **overrides})


def index_of(name: str) -> int:
    return next(i for i, d in enumerate(SPACE) if d.name == name or d.keyword == name)


def test_parse_demographic_maps_labels_and_keywords():
    text, direction = parse_demographic(answer())
    assert text == "A young woman who paints."
    expected = np.full(len(SPACE), 0.5)
    expected[index_of(SPACE[0].name)] = 1.0 if SPACE[0].demo_labels[0] == "Young" else 0.0
    expected[index_of("painting")] = 1.0
    expected[index_of("gaming")] = 0.0
    assert direction.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not_json"),
        ("[1, 2]", "not_an_object"),
        (json.dumps({"reason": "r"}), "missing_keys"),
        (answer(**{"textual persona": "  "}), "empty_textual_persona"),
        (answer(**{"dimension description": {"Shoe size": "Large"}}), "unknown_dimension"),
        (answer(**{"dimension description": {"Age group": "Ancient"}}), "unknown_label"),
        (answer(**{"like keywords": "gaming", "dislike keywords": "gaming"}), "keyword_liked_and_disliked"),
        (answer(**{"like keywords": 3}), "bad_type"),
    ],
)
def test_parse_demographic_rejects_with_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_demographic(text)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from alignx_ray.engines.generation import VllmGenerator

    return VllmGenerator(DEMO.build.demographics.engine, str(tiny_model_dir))


def demo_pairs(n: int) -> pa.Table:
    direction = [0.5] * len(SPACE)
    direction[index_of("painting")] = 1.0
    return pa.table(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": ["What hobby should I pick up?"] * n,
            "chosen": ["I love painting."] * n,
            "rejected": ["Painting bores me."] * n,
            "direction": [direction] * n,
        }
    )


def test_structured_decoding_on_vllm_gives_schema_json(generator, tiny_tokenizer):
    """The random tiny model cannot describe people, but under the JSON schema its answers
    parse; they are kept only when consistent with the pair, else rejected with a reason."""
    config = DemographicsConfig(attempts=2, temperature=1.0)
    out = demographics_batch(generator, tiny_tokenizer, demo_pairs(6), config, prompts.PromptTemplates())
    rows = out.to_pylist()
    assert [r["pair_id"] for r in rows] == [f"p{i}" for i in range(6)]
    for r in rows:
        assert 1 <= r["demo_attempts"] <= 2
        assert (r["demo_text"] is None) == (r["reject_reason"] is not None)
        payload = json.loads(r["demo_raw"], strict=False)  # schema-constrained output is JSON, never cut
        assert set(payload) >= {"reason", "textual persona", "dimension description"}
        # no free whitespace between JSON tokens (generation.COMPACT_JSON, the engine's default)
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", r["demo_raw"]))
        if r["demo_direction"] is not None:
            assert consistent(np.array(r["demo_direction"]), np.array(demo_pairs(1)["direction"][0].as_py()))[0]
    again = demographics_batch(generator, tiny_tokenizer, demo_pairs(6), config, prompts.PromptTemplates())
    assert again.to_pylist() == rows  # seeds come from pair ids: a re-run samples the same answers


def test_a_prompt_over_max_model_len_goes_on_without_p_demo(generator, tiny_tokenizer):
    """vLLM fails a whole call for one prompt over max_model_len: that pair is not sent, and
    goes on without P_DEMO with its reason, while the rest of its batch is answered."""
    pairs = demo_pairs(3)
    chosen = pairs["chosen"].to_pylist()
    chosen[1] = "I love painting, every day and every night. " * 500
    pairs = pairs.set_column(pairs.schema.get_field_index("chosen"), "chosen", pa.array(chosen))
    config = DemographicsConfig(attempts=1)
    rows = demographics_batch(generator, tiny_tokenizer, pairs, config, prompts.PromptTemplates()).to_pylist()
    assert rows[1]["reject_reason"].startswith("prompt_too_long: ")
    assert rows[1]["reject_reason"].endswith(f"> {generator.max_prompt_tokens}")
    assert rows[1]["demo_attempts"] == 0 and rows[1]["demo_raw"] is None
    assert all(rows[i]["demo_attempts"] == 1 and rows[i]["demo_raw"] for i in (0, 2))


@pytest.fixture(scope="module")
def annotated_dir(tmp_path_factory):
    """Planted levels as the annotation (the annotator's own accuracy is tested elsewhere),
    plus one response the annotation stage rejected, which the build must leave out."""
    out = tmp_path_factory.mktemp("annotated")
    table = synthetic.planted_annotations(synthetic.SyntheticConfig(n_threads=60, n_users=20, seed=11))
    first = table.slice(0, 1).to_pylist()[0]
    rows = table.to_pylist() + [{**first, "response_id": "too-long", "levels": [], "reject_reason": "prompt_too_long"}]
    (out / "annotate" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, table.schema), out / "annotate" / "data" / "part-0.parquet")
    return out


@pytest.fixture(scope="module")
def built(annotated_dir, tiny_model_dir, ray_local):
    run = annotated_dir
    config = BuildConfig(
        personas=PersonaConfig(items=8, pool=cpu_pool(16)),
        assemble=AssembleConfig(test_per_cell=2),
        pairs={"pairs_per_thread": 2},
        demographics=DEMO.build.demographics.model_copy(update={"attempts": 1, "pool": cpu_pool(32)}),
    )
    figures = {
        "pairs": run_pairs(config.pairs, run / "annotate", run / "pairs"),
        "personas": run_personas(config.personas, run / "annotate", run / "pairs", run / "personas"),
        "demographics": run_demographics(
            config.demographics, run / "pairs", run / "demographics", str(tiny_model_dir), prompts.PromptTemplates()
        ),
    }
    figures["assemble"] = run_assemble(
        config.assemble, run / "annotate", run / "pairs", run / "personas", run / "demographics", run / "dataset"
    )
    return run, config, figures


def test_every_pair_and_thread_accounted(built):
    run, _, figures = built
    pairs = pq.read_table(run / "pairs" / "data")
    rejected_threads = pq.read_table(run / "pairs" / "_rejected")
    assert figures["pairs"]["responses_in"] == pq.read_table(run / "annotate" / "data").num_rows - 1
    assert (
        len(set(pairs["thread_id"].to_pylist()) | set(rejected_threads["thread_id"].to_pylist()))
        == figures["pairs"]["threads"]
    )
    assert pairs.num_rows == figures["pairs"]["pairs"] > 0
    assert "too-long" not in pairs["chosen_id"].to_pylist() + pairs["rejected_id"].to_pylist()
    personas = pq.read_table(run / "personas" / "data")
    demo = pq.read_table(run / "demographics" / "data")
    assert (
        sorted(personas["pair_id"].to_pylist())
        == sorted(demo["pair_id"].to_pylist())
        == sorted(pairs["pair_id"].to_pylist())
    )
    a = figures["assemble"]
    assert a["train"] + a["test"] + a["rejected"] == a["pairs_in"] == pairs.num_rows


def test_dataset_is_consistent_official_and_split_cleanly(built):
    run, _, figures = built
    train = schema.to_official(pq.read_table(run / "dataset" / "train"))
    test = schema.to_official(pq.read_table(run / "dataset" / "test"))
    assert train.num_rows > 0 and test.num_rows > 0
    assert not set(train["prompt"].to_pylist()) & set(test["prompt"].to_pylist())
    personas = {p["pair_id"]: p for p in pq.read_table(run / "personas" / "data").to_pylist()}
    pairs = {p["pair_id"]: p for p in pq.read_table(run / "pairs" / "data").to_pylist()}
    for row in train.to_pylist() + test.to_pylist():
        p, pair = personas[row["example_id"]], pairs[row["example_id"]]
        votes = [np.array(v) for v in (p["ugc_direction"], p["pair_direction"]) if v is not None]
        assert example_consistent(np.array(row[schema.DIRECTION]), votes)
        own = pair["prompt"]
        assert all(item["prompt"] != own for item in row[schema.UGC] + row[schema.PAIR])
    assert all(len(r[schema.UGC]) == len(r[schema.PAIR]) == 4 for r in test.to_pylist())


def test_datasets_library_loads_the_splits(built):
    datasets = pytest.importorskip("datasets")
    run, _, _ = built
    ds = datasets.load_dataset(
        "parquet",
        data_files={
            "train": str(run / "dataset" / "train" / "*.parquet"),
            "test": str(run / "dataset" / "test" / "*.parquet"),
        },
    )
    assert ds["train"].num_rows == pq.read_table(run / "dataset" / "train").num_rows
    assert set(schema.OFFICIAL_SCHEMA.names) <= set(ds["test"].column_names)


def test_rerun_resumes_from_checkpoints_with_identical_rows(built):
    run, config, _ = built
    before = pq.read_table(run / "personas" / "data").sort_by("pair_id")
    figures = run_personas(config.personas, run / "annotate", run / "pairs", run / "personas")
    after = pq.read_table(run / "personas" / "data").sort_by("pair_id")
    assert after.equals(before) and figures["pairs"] == before.num_rows
    pairs_again = run_pairs(config.pairs, run / "annotate", run / "pairs")
    assert pairs_again["pairs"] == pq.read_table(run / "pairs" / "data").num_rows


def test_split_statistics_stream_to_the_in_memory_figures(built):
    """Statistics from per-block partial sums on Ray Data equal those of the whole matrix."""
    run, _, _ = built
    train = run / "dataset" / "train"
    streamed = split_statistics(train, batch_size=7)  # several blocks of partial sums
    whole = dataset_statistics(directions_from_table(pq.read_table(train)))
    assert np.array_equal(streamed.pop("correlation"), whole.pop("correlation"), equal_nan=True)
    assert streamed == whole and whole["n_examples"] > 7 and whole["distinct_directions"] > 1
