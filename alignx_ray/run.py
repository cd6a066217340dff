"""The run: configuration of every stage, and stages that resume.

Each stage writes `RUN_DIR/<stage>/` and, last, `_manifest.json` holding its figures and a
fingerprint of its config and inputs. A stage whose manifest exists with the same
fingerprint is reused; any other stage is (re)computed, where the row-level stages resume
from their Ray Data checkpoints and training from its Ray Train checkpoint. So re-running a
killed run with the same command finishes it, and the report says what was reused, resumed
and recomputed.

The stages in run order: threads (demo only) -> ingest -> annotate -> pairs -> personas ->
demographics -> universal (when configured) -> dataset (assembly + statistics) -> train_ica /
train_pba -> evaluate / judge.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from alignx_ray.build.annotate import AnnotateConfig, run_annotate
from alignx_ray.build.assemble import AssembleConfig, run_assemble
from alignx_ray.build.demographics import DemographicsConfig, run_demographics
from alignx_ray.build.ingest import IngestConfig, run_ingest
from alignx_ray.build.pairs import PairsConfig, run_pairs
from alignx_ray.build.personas import PersonaConfig, run_personas
from alignx_ray.build.stats import split_sources
from alignx_ray.build.stats_report import table1_markdown, write_split_statistics
from alignx_ray.build.universal import UniversalConfig, run_universal
from alignx_ray.common.config import RayConfig, Section, SpaceConfig
from alignx_ray.common.lease import LeaseConfig, RunLease
from alignx_ray.common.prompts import PromptTemplates
from alignx_ray.common.raydata import claim_workdir, error_summary, init_ray
from alignx_ray.common.seeding import fingerprint
from alignx_ray.engines.logprobs import reward_margin
from alignx_ray.evaluate.accuracy import run_evaluation, score_resumable
from alignx_ray.evaluate.eval_config import EvalConfig
from alignx_ray.evaluate.judge import JudgeConfig, run_binary_choice, run_judge
from alignx_ray.fixtures import synthetic, tiny_annotator
from alignx_ray.fixtures.tiny import TinyModelSpec, build_tiny_model
from alignx_ray.report import RunReport
from alignx_ray.train.dpo_config import TrainConfig
from alignx_ray.train.dpo_data import prepare_training_data, prepared_head
from alignx_ray.train.dpo_trainer import run_training


class BuildConfig(Section):
    """The dataset build: each stage's own settings.

    demographics_enabled: off skips the LLM stage (examples then have no P_DEMO).
    universal: the universal-value files (PKU-SafeRLHF, UltraFeedback, HelpSteer2) mixed into
        train, and their personas' settings; none by default.
    """

    pairs: PairsConfig = PairsConfig()
    personas: PersonaConfig = PersonaConfig()
    demographics: DemographicsConfig = DemographicsConfig()
    assemble: AssembleConfig = AssembleConfig()
    demographics_enabled: bool = True
    universal: UniversalConfig = UniversalConfig()


class RunConfig(Section):
    """Everything a run needs. Code defaults are production's; `configs/demo.yaml` is the
    embedded default's.

    threads: the generated demo threads, used when `ingest.input` is not set.
    train: DPO settings shared by both methods (`alignx train --method` picks one).
    evaluate: how trained models are evaluated (`alignx evaluate`, and the demo).
    judge: the judge win rate and binary-choice accuracy (`alignx judge`, and the demo).
    lease: how a job holds the run directory, so that a second job on it refuses to start.
    """

    run_dir: str = "runs/alignx"
    lease: LeaseConfig = LeaseConfig()
    ray: RayConfig = RayConfig()
    prompts: PromptTemplates = PromptTemplates()
    space: SpaceConfig = SpaceConfig()
    threads: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    ingest: IngestConfig = IngestConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    build: BuildConfig = BuildConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    judge: JudgeConfig = JudgeConfig()


def fit_accuracy(prepared: Path, n: int, config: EvalConfig, policy: str, reference: str, work: Path) -> dict:
    """Alignment accuracy (the evaluation's rule, `reward_margin` > 0) of `policy` on the first
    n prepared training examples, scored by the evaluation's scorer actors: a bounded sample,
    and no model in the driver."""
    sample = prepared_head(prepared, n)
    table = pa.table(
        {
            "row_id": sample["example_id"],
            "prompt_text": sample["prompt"],
            "chosen": sample["chosen"],
            "rejected": sample["rejected"],
        }
    )
    margin = reward_margin(score_resumable(table, config, policy, reference, work))
    return {"fit_accuracy": float(np.mean(margin > 0)), "n": len(margin), "mean_margin": float(np.mean(margin))}


def input_stamp(path: str) -> list:
    """What a run knows of an input's content: the newest modification time of a local file or
    folder's files, else (a URI) its name."""
    local = Path(path)
    if not local.exists():
        return [path]
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    return [path, max((f.stat().st_mtime for f in files), default=None), len(files)]


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / "_manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(report: RunReport, name: str, stage_dir: Path, key: str, compute: Callable[[], dict]) -> dict:
    """Reuse the stage when its manifest carries `key`, else compute it and stamp the manifest.

    A stage left half-done under the same key resumes (status "resumed": it keeps the rows or
    the training checkpoint it had saved); one begun under another key is wiped ("computed").
    A stage that fails is reported ("failed", with its error) before the error goes on.
    """
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("fingerprint") == key:
        figures = {**manifest, "status": "reused"}
    else:
        started = time.time()
        resumed = claim_workdir(stage_dir, key)
        try:
            computed = compute()
        except Exception as e:
            seconds = round(time.time() - started, 2)
            report.add(name, {"status": "failed", "error": error_summary(e), "stage_seconds": seconds})
            raise
        figures = {**computed, "fingerprint": key, "stage_seconds": round(time.time() - started, 2)}
        (stage_dir / "_manifest.json").write_text(json.dumps(figures, indent=1, default=str))
        figures = {**figures, "status": "resumed" if resumed else "computed"}
    report.add(name, figures)
    return figures


class Run:
    """One run directory and its config; each method is one stage. A job uses it in a `with`
    block, which holds the run directory's lease (see `common.lease`)."""

    def __init__(self, config: RunConfig, run_dir: Path, report: RunReport | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.report = report or RunReport(self.run_dir)
        self._model_path: str | None = None
        self._finished: dict[str, dict] = {}
        self._lease: RunLease | None = None

    def __enter__(self) -> Run:
        self._lease = RunLease(self.run_dir, self.config.lease).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._lease.__exit__(*exc)
        self._lease = None

    def stage(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        """Run one stage at most once per Run (later stages ask for their inputs again); none
        once another job has taken the lease over."""
        if name not in self._finished:
            if self._lease:
                self._lease.check()
            self._finished[name] = run_stage(self.report, name, self.dir(name), key, compute)
        return self._finished[name]

    def ray_stage(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        """A stage that runs on Ray: it joins the cluster (or starts a local one) first."""

        def on_ray() -> dict:
            init_ray(self.config.ray)
            return compute()

        return self.stage(name, key, on_ray)

    def statuses(self) -> dict[str, list[str]]:
        """Stage names by status ("reused", "resumed", "computed") in the order they ran."""
        out: dict[str, list[str]] = {}
        for name, figures in self._finished.items():
            out.setdefault(figures["status"], []).append(name)
        return out

    def dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def annotation_model(self) -> str:
        """The configured model, or the tiny annotator the package ships (checked against its
        manifest, and against the traits the demo threads carry)."""
        if self._model_path is None:
            model = self.config.annotate.engine.model
            self._model_path = model or str(tiny_annotator.shipped_annotator(self.config.threads.planted_dimensions))
        return self._model_path

    def annotator_key(self) -> str:
        """What the annotation model is, for stage fingerprints: the configured name, or the
        shipped annotator's manifest digest (its folder is the same whatever it holds)."""
        return self.config.annotate.engine.model or tiny_annotator.verify_annotator()

    def p_tilde_inputs(self) -> tuple:
        """What P~ inferred during evaluation depends on."""
        return self.annotator_key(), self.config.space

    def threads(self) -> dict:
        cfg = self.config.threads
        return self.stage(
            "threads",
            fingerprint(cfg),
            lambda: {name: str(p) for name, p in synthetic.write_threads(cfg, self.dir("threads")).items()},
        )

    def ingest(self) -> dict:
        source = self.config.ingest.input or self.threads()["jsonl"]
        key = fingerprint(self.config.ingest, source, self.annotator_key())
        return self.ray_stage(
            "ingest", key, lambda: run_ingest(self.config.ingest, source, self.dir("ingest"), self.annotation_model())
        )

    def annotate(self) -> dict:
        upstream = self.ingest()
        key = fingerprint(
            self.config.annotate,
            self.config.prompts,
            self.config.space,
            upstream["fingerprint"],
            self.annotator_key(),
        )

        def compute() -> dict:
            return run_annotate(
                self.config.annotate,
                self.dir("ingest") / "data",
                self.dir("annotate"),
                self.annotation_model(),
                self.config.prompts,
                self.config.space,
            )

        return self.ray_stage("annotate", key, compute)

    def pairs(self) -> dict:
        upstream = self.annotate()
        key = fingerprint(self.config.build.pairs, upstream["fingerprint"])
        return self.ray_stage(
            "pairs", key, lambda: run_pairs(self.config.build.pairs, self.dir("annotate"), self.dir("pairs"))
        )

    def personas(self) -> dict:
        upstream = self.pairs()
        cfg = self.config.build.personas
        key = fingerprint(cfg, upstream["fingerprint"])
        return self.ray_stage(
            "personas", key, lambda: run_personas(cfg, self.dir("annotate"), self.dir("pairs"), self.dir("personas"))
        )

    def demographics(self) -> dict | None:
        if not self.config.build.demographics_enabled:
            return None
        upstream = self.pairs()
        cfg = self.config.build.demographics
        model = cfg.engine.model or self.annotation_model()
        model_key = cfg.engine.model or self.annotator_key()
        key = fingerprint(cfg, self.config.prompts, self.config.space, upstream["fingerprint"], model_key)
        return self.ray_stage(
            "demographics",
            key,
            lambda: run_demographics(
                cfg, self.dir("pairs"), self.dir("demographics"), model, self.config.prompts, self.config.space.build()
            ),
        )

    def universal(self) -> dict | None:
        """The universal-value pairs and their personas; None when no file is configured. The
        files enter the key by their modification times (a URI by its name only)."""
        cfg = self.config.build.universal
        if not cfg.sources:
            return None
        key = fingerprint(cfg, self.config.space, [input_stamp(item.path) for item in cfg.sources])
        return self.ray_stage(
            "universal", key, lambda: run_universal(cfg, self.config.space.build(), self.dir("universal"))
        )

    def dataset(self) -> dict:
        """Assemble train / test in the AlignX schema, then the statistics report and the
        examples per source (Table 1)."""
        personas, demo, universal = self.personas(), self.demographics(), self.universal()
        cfg = self.config.build.assemble
        key = fingerprint(
            cfg, personas["fingerprint"], demo and demo["fingerprint"], universal and universal["fingerprint"]
        )
        out = self.dir("dataset")

        def compute() -> dict:
            figures = run_assemble(
                cfg,
                self.dir("annotate"),
                self.dir("pairs"),
                self.dir("personas"),
                self.dir("demographics") if demo else None,
                out,
                self.dir("universal") if universal else None,
            )
            space = self.config.space.build()
            stats = write_split_statistics(out / "train", out / "stats", space, self.run_dir)
            sources = split_sources(out / "train", space)
            markdown = stats.pop("markdown") + "\n" + table1_markdown(sources, space)
            return {**figures, "markdown": markdown, "statistics": stats, "sources": sources}

        return self.ray_stage("dataset", key, compute)

    def policy_model(self) -> str:
        """The configured starting policy, or the demo's tiny model (built in the run directory)."""
        if self.config.train.model:
            return self.config.train.model
        path = self.dir("models") / "policy-tiny"
        if not (path / "config.json").exists():
            build_tiny_model(path, TinyModelSpec(seed=self.config.train.dpo.seed))
        return str(path)

    def train(self, method: str) -> dict:
        """The method's examples rendered once into the stage folder, DPO on them on Ray Train,
        then the fit accuracy on the first `train.fit_sample` of them."""
        cfg = self.config.train.model_copy(update={"method": method})
        if cfg.dataset:
            dataset, upstream = cfg.dataset, cfg.dataset
        else:
            dataset, upstream = str(self.dir("dataset") / "train"), self.dataset()["fingerprint"]
        model = self.policy_model()
        stage = f"train_{method}"
        key = fingerprint(cfg, self.config.prompts, upstream, model)

        def compute() -> dict:
            out, prepared = self.dir(stage), self.dir(stage) / "data"
            prepare_training_data(cfg, dataset, model, self.config.prompts, prepared)
            storage = cfg.storage_path or str((out / "ray").resolve())
            figures, final = run_training(cfg, model, str(prepared), storage, out)
            fit = fit_accuracy(prepared, cfg.fit_sample, self.config.evaluate, final, model, out / "_fit")
            return {**figures, **fit, "model": final}

        return self.ray_stage(stage, key, compute)

    def evaluate(self, method: str, benchmark: str, name: str, upstream: str | None = None) -> dict:
        """The method's trained model against the starting model on one benchmark file
        (`upstream`: the fingerprint of the stage that wrote it, else its modification time)."""
        trained, reference = self.train(method), self.policy_model()
        cfg = self.config.evaluate
        stage = f"evaluate_{method}_{name}"
        key = fingerprint(
            cfg,
            self.config.prompts,
            self.p_tilde_inputs(),
            trained["fingerprint"],
            benchmark,
            upstream or Path(benchmark).stat().st_mtime,
        )

        def compute() -> dict:
            return run_evaluation(
                cfg,
                benchmark,
                method,
                trained["model"],
                reference,
                self.dir(stage),
                self.config.prompts,
                self.annotation_model,
                self.config.space.build(),
            )

        return self.ray_stage(stage, key, compute)

    def judge(self, benchmark: str, name: str, upstream: str | None = None) -> dict:
        """Judge win rate of the ICA model against the PBA model (the judge: `judge.engine.model`,
        else the starting model), and the ICA model's binary-choice accuracy, on one benchmark."""
        ica, pba = self.train("ica"), self.train("pba")
        cfg, judge_model = self.config.judge, self.config.judge.engine.model or self.policy_model()
        stage = f"judge_{name}"
        key = fingerprint(
            cfg,
            self.config.evaluate,
            self.config.prompts,
            self.p_tilde_inputs(),
            ica["fingerprint"],
            pba["fingerprint"],
            judge_model,
            benchmark,
            upstream or Path(benchmark).stat().st_mtime,
        )

        def compute() -> dict:
            args = (self.config.evaluate, benchmark)
            wins = run_judge(
                cfg,
                *args,
                [(ica["model"], "ica"), (pba["model"], "pba")],
                judge_model,
                self.dir(stage) / "win_rate",
                self.config.prompts,
                self.annotation_model,
                self.config.space.build(),
            )
            choice = run_binary_choice(
                cfg,
                *args,
                ica["model"],
                self.dir(stage) / "binary_choice",
                self.config.prompts,
                self.config.space.build(),
            )
            return {"ica_vs_pba": wins, "ica_binary_choice": choice}

        return self.ray_stage(stage, key, compute)
