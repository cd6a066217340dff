"""Evaluation: benchmark reading and rejects, reversal, the accuracy / flip / calibration
arithmetic, and real runs (Ray Data scorer, tiny models) on the official P-SOUPS file and an
AlignX_test parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alignx_rows import alignx_row, direction
from cpu import DEMO, cpu_engine, cpu_pool

from alignx_ray.cli import main
from alignx_ray.common import schema
from alignx_ray.common.space import SPACE
from alignx_ray.engines.logprobs import reward_margin
from alignx_ray.evaluate import examples as eval_data
from alignx_ray.evaluate.accuracy import metrics, run_evaluation, wilson_interval


def cpu_eval(**fields):
    """The demo's evaluation settings (float32, one CPU actor) with `fields`, not capped."""
    return DEMO.evaluate.model_copy(update={"max_examples": None, **fields})


@pytest.fixture(scope="module")
def psoups(official_dir):
    return str(official_dir / "psoups_friendly_unfriendly.json")


@pytest.fixture(scope="module")
def alignx_test(tmp_path_factory):
    path = tmp_path_factory.mktemp("alignx-test") / "test.parquet"
    pq.write_table(
        pa.Table.from_pylist([alignx_row(i, n_ugc=3, n_pair=3) for i in range(4)], schema.ALIGNX_SCHEMA), path
    )
    return str(path)


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    """A second random tiny model (another seed, same tokenizer): scores differ from the policy's."""
    from alignx_ray.fixtures.tiny import TinyModelSpec, build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-ref"), TinyModelSpec(seed=1)))


def test_official_psoups_file_reads_whole(psoups):
    examples, rejected = eval_data.load_benchmark(psoups)
    raw = json.loads(open(psoups).read())
    assert rejected == [] and len(examples) == len(raw)
    e = examples[0]
    assert (e.prompt, e.chosen, e.rejected, e.profile) == (
        raw[0]["prompt"],
        raw[0]["chosen"],
        raw[0]["rejected"],
        raw[0]["profile"],
    )
    assert len(e.pairs) == len(raw[0][schema.PAIR]) and e.ugc == () and e.gold is None
    assert e.has("pair") and not e.has("ugc") and not e.has("demo")
    assert SPACE.describe_direction(SPACE.parse_profile(e.profile)) == e.profile  # the official labels parse


def test_bad_rows_are_rejected_with_reasons(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a", "rejected": "b", schema.DIRECTION: [1.0, 0.0]},
        {"prompt": "p", "chosen": "a", "rejected": "b", schema.PAIR: [{"prompt": "q", "chosen": 3}]},
        "not an object",
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(rows))
    examples, rejected = eval_data.load_benchmark(str(path))
    assert [e.example_id for e in examples] == ["bench-0"]
    assert [r["reason"] for r in rejected] == [
        "missing_chosen",
        "chosen_equals_rejected",
        "bad_direction_target",
        "bad_item_pair",
        "not_an_object",
    ]
    path.write_text('{"prompt": "not a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        eval_data.load_benchmark(str(path))


def test_history_sizes_cut_the_persona_seeded():
    e = eval_data.to_example("x", alignx_row(0, n_ugc=6, n_pair=6), len(SPACE))
    for size in (2, 4, 8):
        v = eval_data.variant(e, "all", size, seed=0)
        assert len(v.ugc) + len(v.pairs) == size and v.demographic == e.demographic
        assert v == eval_data.variant(e, "all", size, seed=0)
    assert len(eval_data.variant(e, "pair", 16).pairs) == 6  # capped by what the example has
    only_ugc = eval_data.variant(e, "ugc", None)
    assert only_ugc.pairs == () and len(only_ugc.ugc) == 6 and only_ugc.demographic == ""


def test_reversal_swaps_target_and_pairs_and_flips_directions():
    row = alignx_row(0, n_ugc=2, n_pair=2)
    profile = SPACE.describe_direction(direction(d2=1.0, d7=0.0))
    e = eval_data.to_example("x", {**row, "profile": profile}, len(SPACE))
    r = eval_data.reverse(eval_data.variant(e, "all", None))
    assert (r.example.chosen, r.example.rejected) == (e.rejected, e.chosen)
    assert [(p["chosen"], p["rejected"]) for p in r.pairs] == [(p["rejected"], p["chosen"]) for p in e.pairs]
    assert r.pairs[0]["direction"][2] == 0.0 and r.example.gold[2] == 0.0 and r.example.gold[0] == 0.5
    assert r.example.profile == SPACE.describe_direction(direction(d2=0.0, d7=1.0))
    assert r.ugc == () and r.demographic == "" and r.reversed and r.row_id.endswith("|rev")
    assert eval_data.reverse(eval_data.variant(e, "ugc", None)) is None  # comments cannot be reversed


def test_metrics_follow_the_official_rule_and_flip_rate():
    # margins: e0 +2 (correct), e1 0 (tie: wrong), e2 -1 (wrong); reversed: e0 +1 (flipped), e1 0, e2 -3 (flipped)
    rows = []
    for eid, m, m_rev in (("e0", 2.0, 1.0), ("e1", 0.0, 0.0), ("e2", -1.0, -3.0)):
        for rev, margin in ((False, m), (True, m_rev)):
            rows.append(
                {
                    "example_id": eid,
                    "persona": "pair",
                    "history": None,
                    "reversed": rev,
                    "policy_chosen": margin - 5.0,
                    "policy_rejected": -4.0,
                    "reference_chosen": -5.0,
                    "reference_rejected": -4.0,
                }
            )
    table = pa.Table.from_pylist(rows)
    assert list(reward_margin(table.to_pydict())) == [2.0, 1.0, 0.0, 0.0, -1.0, -3.0]
    m = metrics(table, cpu_eval(personas=["pair"]))
    assert m["accuracy"] == pytest.approx(1 / 3) and m["n"] == 3 and m["persona"]["pair"]["ties"] == 1
    assert m["reversal"]["pair"]["accuracy"] == pytest.approx(1 / 3)
    assert m["reversal"]["pair"]["flip_rate"] == pytest.approx(2 / 3)
    low, high = m["persona"]["pair"]["ci95"]
    assert low < 1 / 3 < high
    # The reference alone prefers the rejected response everywhere (-5 < -4).
    assert m["starting_model"]["accuracy"] == 0 and m["starting_model"]["n"] == 3


def test_wilson_interval_matches_the_textbook_value():
    assert wilson_interval(8, 10) == [0.4902, 0.9433]  # p = 0.8, n = 10, z = 1.96
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) is None


def test_calibration_counts_per_category():
    inferred = [1.0, 1.0, 0.5, 0.0]
    gold = [1.0, 0.5, 0.5, 1.0]
    c = eval_data.calibration([(inferred, gold)])
    assert c["positive"] == {"precision": 0.5, "recall": 0.5, "predicted": 2, "gold": 2}
    assert c["neutral"] == {"precision": 1.0, "recall": 0.5, "predicted": 1, "gold": 2}
    assert c["negative"]["precision"] == 0.0 and c["negative"]["recall"] is None


def recomputed_accuracy(out) -> dict:
    """Accuracy per (persona, history, reversed) straight from scores.parquet with the rule."""
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    groups = {}
    for r in scores:
        margin = (r["policy_chosen"] - r["reference_chosen"]) - (r["policy_rejected"] - r["reference_rejected"])
        groups.setdefault((r["persona"], r["history"], r["reversed"]), []).append(margin > 0)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def test_psoups_ica_scores_match_metrics_and_self_reference_ties(
    ray_local, tiny_model_dir, reference_model, psoups, tmp_path
):
    config = cpu_eval(personas=["pair"], max_examples=6, pool=cpu_pool(4))
    out = tmp_path / "ica"
    figures = run_evaluation(config, psoups, "ica", str(tiny_model_dir), reference_model, out)
    written = json.loads((out / "metrics.json").read_text())
    assert written["n"] == 6 and written["variants_scored"] == 12  # 6 originals + 6 reversed
    assert pq.read_table(out / "_rejected" / "evaluate.parquet").num_rows == written["rejected"] == 0
    acc = recomputed_accuracy(out)
    assert acc[("pair", None, False)] == written["accuracy"]
    assert acc[("pair", None, True)] == written["reversal"]["pair"]["accuracy"]
    assert 0.0 <= written["reversal"]["pair"]["flip_rate"] <= 1.0
    assert figures["accuracy"] == written["accuracy"]
    # policy == reference, through the CLI on the code defaults (no --config, no cap: every row
    # of the file is scored): every reward is 0, a tie, never correct; nothing flips
    six = tmp_path / "six.json"
    six.write_text(json.dumps(json.loads(open(psoups).read())[:6]))
    main(
        [
            "evaluate",
            "--benchmark",
            str(six),
            "--method",
            "ica",
            "--policy",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "same"),
            "--persona",
            "pair",
        ]
    )
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert same["accuracy"] == 0.0 and same["persona"]["pair"]["ties"] == 6
    reversed_ = same["reversal"]["pair"]
    assert {k: reversed_[k] for k in ("accuracy", "n", "ties", "flip_rate")} == {
        "accuracy": 0.0,
        "n": 6,
        "ties": 6,
        "flip_rate": 0.0,
    }
    assert reversed_["ci95"][0] == 0.0 < reversed_["ci95"][1] < 0.5  # 0 of 6: the interval still spans 0.39


def test_pba_profiles_from_field_gold_and_inference(
    ray_local, tiny_model_dir, reference_model, psoups, alignx_test, tmp_path
):
    field = run_evaluation(
        cpu_eval(personas=["pair"], max_examples=3, reversal=False),
        psoups,
        "pba",
        str(tiny_model_dir),
        reference_model,
        tmp_path / "field",
    )
    scores = pq.read_table(tmp_path / "field" / "scores.parquet").to_pylist()
    raw = json.loads(open(psoups).read())
    assert [r["profile"] for r in scores] == [raw[i]["profile"] for i in range(3)]
    assert all(r["profile_source"] == "field" and raw[i]["profile"] in r["prompt_text"] for i, r in enumerate(scores))
    assert field["n"] == 3

    config = cpu_eval(
        personas=["all"],
        history_sizes=[2, 4],
        profile_source="infer",
        reversal=False,
        direction_engine=cpu_engine(kind="transformers", model=str(tiny_model_dir)),
    )
    inferred = run_evaluation(config, alignx_test, "pba", str(tiny_model_dir), reference_model, tmp_path / "infer")
    assert set(inferred["history"]) == {"2", "4"} and inferred["history"]["2"]["n"] == 4
    calibration = inferred["calibration"]  # inferred P~ against the rows' gold direction (d2 positive)
    assert calibration["positive"]["gold"] == 8 and calibration["neutral"]["gold"] == 8 * (len(SPACE) - 1)
    assert sum(c["predicted"] for c in calibration.values()) == 8 * len(SPACE)
    for key, acc in recomputed_accuracy(tmp_path / "infer").items():
        assert acc == inferred["history"][str(key[1])]["accuracy"]

    gold = run_evaluation(
        config.model_copy(update={"profile_source": "gold"}),
        alignx_test,
        "pba",
        str(tiny_model_dir),
        reference_model,
        tmp_path / "gold",
    )
    profiles = {r["profile"] for r in pq.read_table(tmp_path / "gold" / "scores.parquet").to_pylist()}
    assert profiles == {SPACE[2].positive} and "calibration" not in gold
