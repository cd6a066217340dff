"""The run: configuration of every stage, and stages that resume.

Each stage writes `RUN_DIR/<stage>/` and, last, `_manifest.json` holding its figures and a
fingerprint of its config and inputs. A stage whose manifest exists with the same
fingerprint is reused; any other stage is (re)computed, where the annotation stage itself
resumes row by row from its Ray Data checkpoint. So re-running a killed run with the same
command finishes it, and the report says what was reused and what was recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from alignx_ray import synthetic
from alignx_ray.annotate import AnnotateConfig, run_annotate
from alignx_ray.annotator import AnnotatorConfig, build_annotator
from alignx_ray.config import RayConfig, Section, SpaceConfig
from alignx_ray.dataset import BuildConfig
from alignx_ray.dpo_config import TrainConfig
from alignx_ray.evaluate import EvalConfig
from alignx_ray.ingest import IngestConfig, run_ingest
from alignx_ray.judge import JudgeConfig
from alignx_ray.prompts import PromptTemplates
from alignx_ray.report import RunReport


class RunConfig(Section):
    """Everything a run needs; `configs/demo.yaml` is the embedded default.

    threads: the generated demo threads, used when `ingest.input` is not set.
    annotator: the tiny annotator, used when `annotate.engine.model` is not set.
    train: DPO settings shared by both methods (`train.method` picks one for `alignx train`).
    evaluate: how trained models are evaluated (`alignx evaluate`, and the demo).
    judge: the judge win rate and binary-choice accuracy (`alignx judge`, and the demo).
    """

    run_dir: str = "runs/demo"
    ray: RayConfig = RayConfig()
    prompts: PromptTemplates = PromptTemplates()
    space: SpaceConfig = SpaceConfig()
    threads: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    annotator: AnnotatorConfig = AnnotatorConfig()
    ingest: IngestConfig = IngestConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    build: BuildConfig = BuildConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    judge: JudgeConfig = JudgeConfig()


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / "_manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(report: RunReport, name: str, stage_dir: Path, key: str, compute: Callable[[], dict]) -> dict:
    """Reuse the stage when its manifest carries `key`, else compute it and stamp the manifest.

    A stage left half-done under the same key resumes (status "resumed": it keeps the rows or
    the training checkpoint it had saved); one begun under another key is wiped ("computed").
    """
    manifest = read_manifest(stage_dir)
    if manifest and manifest.get("fingerprint") == key:
        figures = {**manifest, "status": "reused"}
    else:
        started = time.time()
        begun = stage_dir / "_started.json"
        resumed = begun.exists() and json.loads(begun.read_text()).get("fingerprint") == key
        if begun.exists() and not resumed:
            shutil.rmtree(stage_dir)  # partial work of another config must not be resumed
        stage_dir.mkdir(parents=True, exist_ok=True)
        begun.write_text(json.dumps({"fingerprint": key}))
        figures = {**compute(), "fingerprint": key}
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "_manifest.json").write_text(json.dumps(figures, indent=1, default=str))
        figures = {**figures, "status": "resumed" if resumed else "computed",
                   "stage_seconds": round(time.time() - started, 2)}
    report.add(name, figures)
    return figures


class Run:
    """One run directory and its config; each method is one stage."""

    def __init__(self, config: RunConfig, run_dir: Path, report: RunReport | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.report = report or RunReport(self.run_dir)
        self._model_path: str | None = None
        self._finished: dict[str, dict] = {}

    def stage(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        """Run one stage at most once per Run (later stages ask for their inputs again)."""
        if name not in self._finished:
            self._finished[name] = run_stage(self.report, name, self.dir(name), key, compute)
        return self._finished[name]

    def statuses(self) -> dict[str, list[str]]:
        """Stage names by status ("reused", "resumed", "computed") in the order they ran."""
        out: dict[str, list[str]] = {}
        for name, figures in self._finished.items():
            out.setdefault(figures["status"], []).append(name)
        return out

    def dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def annotation_model(self) -> str:
        """The configured model, or the tiny annotator (built once per machine, then cached)."""
        if self._model_path is None:
            model = self.config.annotate.engine.model
            # The annotator must read the traits the demo threads carry.
            annotator = self.config.annotator.model_copy(
                update={"planted_dimensions": self.config.threads.planted_dimensions})
            self._model_path = model or str(build_annotator(annotator))
        return self._model_path

    def p_tilde_inputs(self) -> tuple:
        """What P~ inferred during evaluation depends on (the annotator is resolved only when
        something must be inferred, so its config stands in for its path)."""
        return self.config.annotate.engine.model, self.config.annotator, self.config.threads.planted_dimensions, \
            self.config.space

    def threads(self) -> dict:
        cfg = self.config.threads
        return self.stage("threads", fingerprint(cfg),
                          lambda: {name: str(p) for name, p in synthetic.write_threads(cfg, self.dir("threads")).items()})

    def ingest(self) -> dict:
        from transformers import AutoTokenizer

        source = self.config.ingest.input or self.threads()["jsonl"]
        key = fingerprint(self.config.ingest, source, self.annotation_model())
        return self.stage("ingest", key, lambda: run_ingest(
            self.config.ingest, source, self.dir("ingest"), AutoTokenizer.from_pretrained(self.annotation_model())))

    def annotate(self) -> dict:
        from alignx_ray.raycluster import init_ray

        upstream = self.ingest()
        key = fingerprint(self.config.annotate, self.config.prompts, self.config.space, upstream["fingerprint"],
                          self.annotation_model())

        def compute() -> dict:
            init_ray(self.config.ray)
            return run_annotate(self.config.annotate, self.dir("ingest") / "data", self.dir("annotate"),
                                self.annotation_model(), self.config.prompts, self.config.space)

        return self.stage("annotate", key, compute)

    def pairs(self) -> dict:
        from alignx_ray.dataset import run_pairs

        upstream = self.annotate()
        key = fingerprint(self.config.build.pairs, upstream["fingerprint"])
        return self.stage("pairs", key,
                          lambda: run_pairs(self.config.build.pairs, self.dir("annotate"), self.dir("pairs")))

    def personas(self) -> dict:
        from alignx_ray.dataset import run_personas

        upstream = self.pairs()
        build = self.config.build
        key = fingerprint(build.personas, build.persona_batch, upstream["fingerprint"])
        return self.stage("personas", key, lambda: run_personas(
            build, self.dir("annotate"), self.dir("pairs"), self.dir("personas")))

    def demographics(self) -> dict | None:
        from alignx_ray.dataset import run_demographics

        if not self.config.build.demographics_enabled:
            return None
        upstream = self.pairs()
        cfg = self.config.build.demographics
        model = cfg.engine.model or self.annotation_model()
        key = fingerprint(cfg, self.config.prompts, self.config.space, upstream["fingerprint"], model)
        return self.stage("demographics", key, lambda: run_demographics(
            cfg, self.dir("pairs"), self.dir("demographics"), model, self.config.prompts, self.config.space.build()))

    def dataset(self) -> dict:
        """Assemble train / test in the AlignX schema, then the statistics report."""
        import pyarrow.parquet as pq

        from alignx_ray.dataset import run_assemble
        from alignx_ray.stats import write_statistics

        personas, demo = self.personas(), self.demographics()
        cfg = self.config.build.assemble
        key = fingerprint(cfg, personas["fingerprint"], demo and demo["fingerprint"])
        out = self.dir("dataset")

        def compute() -> dict:
            figures = run_assemble(cfg, self.dir("pairs"), self.dir("personas"),
                                   self.dir("demographics") if demo else None, out)
            stats = write_statistics(pq.read_table(out / "train"), out / "stats", self.config.space.build(),
                                     report_dir=self.run_dir)
            return {**figures, "markdown": stats.pop("markdown"), "statistics": stats}

        return self.stage("dataset", key, compute)

    def policy_model(self) -> str:
        """The configured starting policy, or the demo's tiny model (built in the run directory)."""
        from alignx_ray.tiny import TinyModelSpec, build_tiny_model

        if self.config.train.model:
            return self.config.train.model
        path = self.dir("models") / "policy-tiny"
        if not (path / "config.json").exists():
            build_tiny_model(path, TinyModelSpec(seed=self.config.train.dpo.seed))
        return str(path)

    def train(self, method: str) -> dict:
        """DPO of one method on Ray Train, then its fit accuracy on the pairs it was trained on."""
        from alignx_ray.dpo_trainer import fit_accuracy, run_training, training_examples
        from alignx_ray.raycluster import init_ray

        cfg = self.config.train.model_copy(update={"method": method})
        if cfg.dataset:
            dataset, upstream = cfg.dataset, cfg.dataset
        else:
            dataset, upstream = str(self.dir("dataset") / "train"), self.dataset()["fingerprint"]
        model = self.policy_model()
        stage = f"train_{method}"
        key = fingerprint(cfg, self.config.prompts, upstream, model)

        def compute() -> dict:
            from transformers import AutoTokenizer

            init_ray(self.config.ray)
            storage = cfg.storage_path or str((self.dir(stage) / "ray").resolve())
            figures, final = run_training(cfg, model, dataset, storage, self.dir(stage), self.config.prompts)
            examples = training_examples(cfg, dataset, AutoTokenizer.from_pretrained(model), self.config.prompts)
            return {**figures, **fit_accuracy(final, model, examples), "model": final}

        return self.stage(stage, key, compute)

    def evaluate(self, method: str, benchmark: str, name: str, upstream: str | None = None) -> dict:
        """The method's trained model against the starting model on one benchmark file
        (`upstream`: the fingerprint of the stage that wrote it, else its modification time)."""
        from alignx_ray.evaluate import run_evaluation
        from alignx_ray.raycluster import init_ray

        trained, reference = self.train(method), self.policy_model()
        cfg = self.config.evaluate
        stage = f"evaluate_{method}_{name}"
        key = fingerprint(cfg, self.config.prompts, self.p_tilde_inputs(), trained["fingerprint"], benchmark,
                          upstream or Path(benchmark).stat().st_mtime)

        def compute() -> dict:
            init_ray(self.config.ray)
            return run_evaluation(cfg, benchmark, method, trained["model"], reference, self.dir(stage),
                                  self.config.prompts, self.annotation_model, self.config.space.build())

        return self.stage(stage, key, compute)

    def judge(self, benchmark: str, name: str, upstream: str | None = None) -> dict:
        """Judge win rate of the ICA model against the PBA model (the judge: `judge.engine.model`,
        else the starting model), and the ICA model's binary-choice accuracy, on one benchmark."""
        from alignx_ray.judge import run_binary_choice, run_judge
        from alignx_ray.raycluster import init_ray

        ica, pba = self.train("ica"), self.train("pba")
        cfg, judge_model = self.config.judge, self.config.judge.engine.model or self.policy_model()
        stage = f"judge_{name}"
        key = fingerprint(cfg, self.config.evaluate, self.config.prompts, self.p_tilde_inputs(), ica["fingerprint"],
                          pba["fingerprint"], judge_model, benchmark, upstream or Path(benchmark).stat().st_mtime)

        def compute() -> dict:
            init_ray(self.config.ray)
            args = (self.config.evaluate, benchmark)
            wins = run_judge(cfg, *args, [(ica["model"], "ica"), (pba["model"], "pba")], judge_model,
                             self.dir(stage) / "win_rate", self.config.prompts, self.annotation_model,
                             self.config.space.build())
            choice = run_binary_choice(cfg, *args, ica["model"], self.dir(stage) / "binary_choice", self.config.prompts,
                                       self.config.space.build())
            return {"ica_vs_pba": wins, "ica_binary_choice": choice}

        return self.stage(stage, key, compute)
