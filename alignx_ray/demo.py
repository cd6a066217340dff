"""The embedded default: every stage on generated threads with planted traits, locally.

The planted truth is kept beside the threads, so each stage's output is checked against it
in the report, which makes the demo an end-to-end test of the whole path, not a smoke run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from alignx_ray.common.space import NEUTRAL, compare_levels, level_to_direction
from alignx_ray.evaluate.accuracy import percent
from alignx_ray.fixtures.tiny_annotator import REPORT, label_accuracy
from alignx_ray.report import SUMMARY, RunReport, seconds_chart
from alignx_ray.run import Run, RunConfig


def annotation_vs_truth(run: Run) -> dict:
    """Label accuracy of the annotation stage against the planted levels."""
    truth = pq.read_table(run.dir("threads") / "truth.parquet").to_pydict()
    levels_true = dict(zip(truth["response_id"], truth["levels"]))
    out = pq.read_table(run.dir("annotate") / "data", columns=["response_id", "levels", "option_probs"]).to_pydict()
    ids = [rid for rid, lv in zip(out["response_id"], out["levels"]) if lv]
    probs = np.array([p for p, lv in zip(out["option_probs"], out["levels"]) if lv], dtype=np.float32)
    return label_accuracy(np.array([levels_true[rid] for rid in ids]), probs)


def dataset_vs_truth(run: Run) -> dict:
    """How often the dataset's directions equal those computed from the planted levels: the
    pair direction against compare_levels(planted y_w, planted y_l), a UGC item against its
    planted level vs the median, a PAIR item against its own planted pair. Counted two ways:
    `on_planted`, over the dimensions where the planted direction is non-neutral (does the
    dataset find the preference that is there?), and `on_labelled`, over those where the
    dataset's direction is non-neutral (is a preference it states really there?)."""
    truth = pq.read_table(run.dir("threads") / "truth.parquet").to_pydict()
    levels = {rid: np.asarray(lv) for rid, lv in zip(truth["response_id"], truth["levels"])}
    pairs = pq.read_table(run.dir("pairs") / "data", columns=["pair_id", "chosen_id", "rejected_id"]).to_pylist()
    planted = {p["pair_id"]: compare_levels(levels[p["chosen_id"]], levels[p["rejected_id"]]) for p in pairs}
    personas = pq.read_table(run.dir("personas") / "data", columns=["pair_id", "ugc", "pair_feedback"]).to_pylist()
    counts = {(kind, side): [0, 0] for kind in ("pair", "ugc_item", "pair_item") for side in ("planted", "labelled")}

    def check(kind: str, got, want) -> None:
        got, want = np.asarray(got), np.asarray(want)
        for side, decided in (("planted", want != NEUTRAL), ("labelled", got != NEUTRAL)):
            counts[kind, side][0] += int((got == want)[decided].sum())
            counts[kind, side][1] += int(decided.sum())

    examples = {}
    for split in ("train", "test"):
        table = pq.read_table(run.dir("dataset") / split, columns=["example_id", "Preference Direction"])
        examples.update(zip(*table.to_pydict().values()))
    for p in personas:
        if p["pair_id"] not in examples:
            continue
        check("pair", examples[p["pair_id"]], planted[p["pair_id"]])
        for item in p["ugc"]:
            check("ugc_item", item["direction"], level_to_direction(levels[item["response_id"]]))
        for item in p["pair_feedback"]:
            check("pair_item", item["direction"], planted[item["pair_id"]])
    return {
        f"{kind}_agreement_on_{side}": round(hit / n, 4) if n else None for (kind, side), (hit, n) in counts.items()
    } | {f"{kind}_dimensions_{side}": n for (kind, side), (_, n) in counts.items()}


def demo_benchmarks(run: Run) -> dict[str, tuple[str, str | None]]:
    """name -> (file, upstream fingerprint): the run's AlignX_test, the configured benchmark
    files, and the official P-SOUPS file when ALIGNX_OFFICIAL_DIR points at the official data."""
    benchmarks = {"alignx_test": (str(run.dir("dataset") / "test"), run.dataset()["fingerprint"])}
    official = os.environ.get("ALIGNX_OFFICIAL_DIR")
    files = list(run.config.evaluate.benchmarks)
    if official and (Path(official) / "psoups_friendly_unfriendly.json").exists():
        files.append(str(Path(official) / "psoups_friendly_unfriendly.json"))
    benchmarks.update({Path(f).stem: (f, None) for f in files})
    return benchmarks


def evaluate_all(run: Run) -> None:
    """Both trained methods on every demo benchmark, the judge on AlignX_test, one table."""
    rows = [
        "| method | benchmark | persona | accuracy (%) | n | reversed accuracy (%) | flip rate (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (path, upstream) in demo_benchmarks(run).items():
        for method in ("ica", "pba"):
            figures = run.evaluate(method, path, name, upstream)
            for persona, group in figures["persona"].items():
                rev = figures["reversal"].get(persona, {})
                rows.append(
                    f"| {method.upper()} | {name} | {persona} | {percent(group['accuracy'])} | {group['n']} | "
                    f"{percent(rev.get('accuracy'))} | {percent(rev.get('flip_rate'))} |"
                )
    name, (path, upstream) = "alignx_test", demo_benchmarks(run)["alignx_test"]
    judged = run.judge(path, name, upstream)
    wins, choice = judged["ica_vs_pba"], judged["ica_binary_choice"]
    rows += [
        "",
        f"Judge ({wins['judge']}) on {name}: ICA against PBA win {wins['win']}, lose {wins['lose']}, "
        f"tie {wins['tie']}, unusable {wins['invalid']}; win rate {percent(wins['win_rate'])} %. "
        f"ICA's binary-choice accuracy: {percent(choice['accuracy'])} % of {choice['n']}.",
    ]
    run.report.add("evaluation", {"markdown": "\n".join(rows)})


def demographic_note(figures: dict | None) -> str:
    """Why most demo pairs have no P_DEMO: the tiny model is taught Prompt #1, not Prompt #2."""
    if not figures:
        return "P_DEMO: not built (`build.demographics_enabled: false`)."
    reasons = sorted(figures["reasons"].items(), key=lambda kv: -kv[1])
    why = ", ".join(f"{reason} {n}" for reason, n in reasons[:3]) or "none"
    return (
        f"P_DEMO kept on {figures['with_demographic']} of {figures['pairs']} pairs (dropped: {why}). "
        "The tiny model is taught Prompt #1's answer only, not Prompt #2's: it writes schema-valid JSON, "
        "but its like / dislike keywords are not those of the pair, so the consistency check (paper A.2 (2)) "
        "drops the persona and the example goes on with P_UGC and P_PAIR. A model that follows Prompt #2 "
        "(production's LLM) keeps it where it agrees with the pair."
    )


def summary_markdown(stages: dict[str, dict], total_seconds: float) -> str:
    """What ran, counts in and out, held-out accuracy, and time per stage: what a person reads
    before the per-stage details."""
    get = lambda stage, figure: stages.get(stage, {}).get(figure, "–")  # noqa: E731
    ran: dict[str, list[str]] = {}
    for name, figures in stages.items():
        if "status" in figures:
            ran.setdefault(figures["status"], []).append(name)
    lines = [
        f"Every stage on generated threads with planted traits, on a local Ray instance, in {total_seconds:.0f} s "
        f"({'; '.join(f'{status}: {len(names)}' for status, names in ran.items())}).",
        "",
        "| step | in | out | rejected |",
        "|---|---:|---:|---:|",
        f"| ingest (responses) | {get('ingest', 'responses')} | {get('annotate', 'responses_in')} | "
        f"{get('ingest', 'rejected')} |",
        f"| annotate (responses) | {get('annotate', 'responses_in')} | {get('annotate', 'labelled')} | "
        f"{get('annotate', 'rejected')} |",
        f"| pairs (threads -> pairs) | {get('pairs', 'threads')} | {get('pairs', 'pairs')} | "
        f"{get('pairs', 'threads_rejected')} |",
        f"| dataset (pairs -> train + test) | {get('dataset', 'pairs_in')} | "
        f"{get('dataset', 'train')} + {get('dataset', 'test')} | {get('dataset', 'rejected')} |",
        "",
        demographic_note(stages.get("demographics")),
        "",
        "Held out: AlignX_test, whose threads no training example comes from. Accuracy with its 95 % interval; "
        "the starting model is the untrained policy's own order of the two responses.",
        "",
        "| method | persona | accuracy (%) | 95 % interval | n | flip rate under reversal (%) | starting model (%) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for method in ("ica", "pba"):
        figures = stages.get(f"evaluate_{method}_alignx_test", {})
        for persona, group in figures.get("persona", {}).items():
            interval = group.get("ci95") or [None, None]
            start = figures.get("starting_model", {}).get("persona", {}).get(persona, {})
            lines.append(
                f"| {method.upper()} | {persona} | {percent(group['accuracy'])} | "
                f"{percent(interval[0])}–{percent(interval[1])} | {group['n']} | "
                f"{percent(figures['reversal'].get(persona, {}).get('flip_rate'))} | {percent(start.get('accuracy'))} |"
            )
    lines += [
        "",
        f"At this size (a 2-layer model, {get('train_pba', 'step')} DPO steps on {get('dataset', 'train')} pairs, "
        f"{get('dataset', 'test')} held-out examples) these figures test the path, not personalization: "
        "`benchmarks/synthetic_alignment.py` measures that on 2,000+ threads.",
    ]
    chart = seconds_chart({name: figures for name, figures in stages.items() if name not in (SUMMARY, "run")})
    return "\n".join([*lines, "", "Time per stage (a reused stage shows the time it took when computed):", "", chart])


def run_demo(config: RunConfig, run_dir: Path) -> RunReport:
    started = time.time()
    with Run(config, run_dir, RunReport(run_dir, "alignx-ray demo")) as run:
        annotator = json.loads((Path(run.annotation_model()) / REPORT).read_text())
        run.report.add(
            "annotator",
            {
                "path": run.annotation_model(),
                "label_accuracy_unseen_threads": annotator["accuracy"],
                "planted_label_accuracy_unseen_threads": annotator["planted_accuracy"],
                "build_seconds": annotator["seconds"],
            },
        )
        run.annotate()
        run.report.add("annotate_vs_planted", annotation_vs_truth(run))
        run.dataset()
        run.report.add("dataset_vs_planted", dataset_vs_truth(run))
        for method in ("ica", "pba"):
            run.train(method)
        evaluate_all(run)
        seconds = round(time.time() - started, 1)
        run.report.add("run", {"seconds": seconds, **run.statuses()})
        run.report.add(SUMMARY, {"markdown": summary_markdown(run.report.stages, seconds)})
    return run.report
