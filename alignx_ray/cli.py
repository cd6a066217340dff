"""`alignx`: one command-line entry for every stage, the demo and the tools.

Commands without `--config` run on the code defaults (production's); only `alignx demo`
defaults to `configs/demo.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alignx_ray.common.config import load_config
from alignx_ray.common.lease import LeaseHeld
from alignx_ray.common.space import describe_direction, parse_profile

DEMO_CONFIG = "configs/demo.yaml"


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help=f"YAML config (default: {default or 'the code defaults'})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set annotate.pool.batch_size=8 (repeatable)",
    )


def _run(args, run_dir: str | None):
    """The configured Run of a command in `run_dir` (None: the config's run_dir); `--input`,
    where the command has it, replaces the config's `ingest.input`. A command uses it in a
    `with` block, which holds the run directory's lease."""
    # lazy: the stages import torch, transformers and Ray, which `alignx --help` does not need
    from alignx_ray.run import Run, RunConfig

    config = load_config(RunConfig, args.config, args.overrides)
    if getattr(args, "input", None):
        config = config.model_copy(update={"ingest": config.ingest.model_copy(update={"input": args.input})})
    return Run(config, Path(run_dir or config.run_dir))


def _print_figures(figures: dict) -> None:
    print(json.dumps({k: v for k, v in figures.items() if k not in ("fingerprint", "markdown")}, indent=1, default=str))


def cmd_tiny_model(args) -> None:
    # lazy: builds with torch
    from alignx_ray.fixtures.tiny import TinyModelSpec, build_tiny_model
    from alignx_ray.fixtures.tiny_annotator import SHIPPED, AnnotatorConfig, build_annotator

    if args.annotator:
        out = Path(args.out) if args.out else SHIPPED
        report = build_annotator(AnnotatorConfig(seed=args.seed), out)
        print(
            f"annotator: {out}\nlabel accuracy on unseen threads: {report['accuracy']:.4f} "
            f"(planted dimensions {report['planted_accuracy']:.4f}), built in {report['seconds']} s"
        )
        return
    if not args.out:
        sys.exit("--out is required (or use --annotator)")
    out = build_tiny_model(args.out, TinyModelSpec(arch=args.arch, seed=args.seed))
    print(f"tiny {args.arch} model and tokenizer saved to {out}")


def cmd_profile(args) -> None:
    if args.vector is not None:
        print(describe_direction(json.loads(args.vector)))
    else:
        print(json.dumps(parse_profile(args.text)))


def cmd_demo(args) -> None:
    # lazy: the whole run (torch, transformers, Ray)
    from alignx_ray.demo import run_demo
    from alignx_ray.run import RunConfig

    config = load_config(RunConfig, args.config, args.overrides)
    report = run_demo(config, Path(args.run_dir or config.run_dir))
    print(f"\nreport: {report.json_path} and {report.json_path.with_suffix('.md')}")


def cmd_annotate(args) -> None:
    with _run(args, args.run_dir) as run:
        _print_figures(run.annotate())
    print(f"\nannotations: {run.dir('annotate') / 'data'}  report: {run.report.json_path}")


def cmd_build(args) -> None:
    with _run(args, args.run_dir) as run:
        _print_figures(run.dataset())
    print(f"\ndataset: {run.dir('dataset')}/{{train,test}}  report: {run.report.json_path}")


def cmd_train(args) -> None:
    with _run(args, args.run_dir) as run:
        figures = run.train(args.method)
    _print_figures(figures)
    print(f"\nmodel: {figures['model']}  report: {run.report.json_path}")


def cmd_evaluate(args) -> None:
    # lazy: scoring loads torch and Ray
    from alignx_ray.common.raydata import init_ray
    from alignx_ray.evaluate.accuracy import run_evaluation

    run = _run(args, args.out)
    updates = {
        "personas": args.persona,
        "history_sizes": args.history,
        "profile_source": args.profile_source,
        "max_examples": args.max_examples,
    }
    if args.no_reversal:
        updates["reversal"] = False
    cfg = run.config.evaluate.model_copy(update={k: v for k, v in updates.items() if v})
    init_ray(run.config.ray)
    with run:
        figures = run_evaluation(
            cfg,
            args.benchmark,
            args.method,
            args.policy,
            args.reference or args.policy,
            Path(args.out),
            run.config.prompts,
            run.annotation_model,
            run.config.space.build(),
        )
    print(figures.pop("markdown"))
    print(f"\nmetrics: {Path(args.out) / 'metrics.json'}  scores: {Path(args.out) / 'scores.parquet'}")


def cmd_judge(args) -> None:
    # lazy: the engines load vLLM and Ray
    from alignx_ray.common.raydata import init_ray
    from alignx_ray.evaluate.judge import run_binary_choice, run_judge
    from alignx_ray.run import RunConfig

    config = load_config(RunConfig, args.config, args.overrides)
    init_ray(config.ray)
    out = Path(args.out)
    space = config.space.build()
    if args.binary_choice:
        figures = run_binary_choice(
            config.judge, config.evaluate, args.benchmark, args.binary_choice, out, config.prompts, space
        )
        print(f"binary-choice accuracy {figures['accuracy']} over {figures['n']} ({figures['n_invalid']} unusable)")
    else:
        if not (args.model_a and args.model_b and args.judge):
            sys.exit("--model-a, --model-b and --judge are required (or --binary-choice MODEL)")
        contenders = [(args.model_a, args.method_a), (args.model_b, args.method_b)]
        figures = run_judge(
            config.judge, config.evaluate, args.benchmark, contenders, args.judge, out, config.prompts, space=space
        )
        print(
            f"win rate of A {figures['win_rate']}: win {figures['win']}, lose {figures['lose']}, "
            f"tie {figures['tie']}, unusable {figures['invalid']}"
        )
    print(f"figures: {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build a tiny local tokenizer + model (or the tiny annotator)")
    p.add_argument("--out", help="output directory (with --annotator: default the one the package ships)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument(
        "--annotator",
        action="store_true",
        help="fine-tune the tiny model to read the demo's planted traits (the annotator the package ships)",
    )
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("profile", help="convert a PBA profile text to a direction vector and back")
    p.add_argument("text", nargs="?", default="", help="profile text to parse")
    p.add_argument("--vector", help="JSON list of directions to describe instead")
    p.set_defaults(func=cmd_profile)

    for name, func, what in (
        ("annotate", cmd_annotate, "ingest threads and label every response on every dimension"),
        ("build", cmd_build, "build the AlignX dataset: ingest, annotation, pairs, personas, splits, statistics"),
    ):
        p = sub.add_parser(name, help=what)
        _config_args(p)
        p.add_argument("--input", help="threads to read: a file, folder or URI (default: the config's ingest.input)")
        p.add_argument("--run-dir", help="output directory (default: the config's run_dir)")
        p.set_defaults(func=func)

    p = sub.add_parser("train", help="DPO training of ICA or PBA on Ray Train (TRL + DeepSpeed ZeRO-3)")
    _config_args(p)
    p.add_argument("--method", choices=["ica", "pba"], required=True, help="the format trained on (paper §5)")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="alignment accuracy of a policy on an official benchmark file or AlignX_test")
    _config_args(p)
    p.add_argument("--benchmark", required=True, help="official benchmark JSON, or an AlignX parquet file or folder")
    p.add_argument("--method", choices=["ica", "pba"], required=True, help="the format the policy was trained on")
    p.add_argument("--policy", required=True, help="the trained model (local path or model-store path)")
    p.add_argument("--reference", help="the reference model (default: the policy, which scores every pair a tie)")
    p.add_argument("--out", required=True, help="output directory: metrics.json, scores.parquet")
    p.add_argument(
        "--persona",
        action="append",
        choices=["ugc", "pair", "demo", "all"],
        help="persona type to evaluate (repeatable; default: the config's evaluate.personas)",
    )
    p.add_argument(
        "--history",
        action="append",
        type=int,
        help="persona items kept per example (repeatable: a sweep, e.g. 2 4 8 16; default: all)",
    )
    p.add_argument(
        "--profile-source",
        choices=["auto", "field", "gold", "items", "infer"],
        help="PBA: where P~ comes from (default: the config's evaluate.profile_source)",
    )
    p.add_argument("--max-examples", type=int, help="score the first N rows only (default: every row)")
    p.add_argument("--no-reversal", action="store_true", help="skip the reversed-preference variants")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("judge", help="judge win rate of two models (Table 3), or binary-choice accuracy (Table 10)")
    _config_args(p)
    p.add_argument("--benchmark", required=True, help="official benchmark JSON, or an AlignX parquet file or folder")
    p.add_argument("--model-a", help="first model; its responses are judged against --model-b's")
    p.add_argument("--method-a", choices=["ica", "pba"], default="ica", help="the prompt format model A answers in")
    p.add_argument("--model-b", help="second model")
    p.add_argument("--method-b", choices=["ica", "pba"], default="ica")
    p.add_argument("--judge", help="the judge model (vLLM), conditioned on the user's persona")
    p.add_argument(
        "--binary-choice",
        metavar="MODEL",
        help="instead: ask MODEL which response the user prefers and report its accuracy",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("demo", help="run every stage on the embedded default, on a local Ray instance")
    _config_args(p, DEMO_CONFIG)
    p.add_argument("--run-dir", help="output directory (default: the config's run_dir)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LeaseHeld as e:
        sys.exit(f"alignx {args.command}: {e}")


if __name__ == "__main__":
    main()
