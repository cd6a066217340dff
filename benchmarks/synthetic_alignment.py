"""Personalization learned, shown where the truth is known: ICA and PBA trained by DPO on a
synthetic AlignX, scored on held-out AlignX_test against the untrained starting model.

    python benchmarks/synthetic_alignment.py                     # 2,400 threads, both methods
    python benchmarks/synthetic_alignment.py --threads 400 --epochs 1 --out quick.json
    python benchmarks/synthetic_alignment.py --methods pba --max-examples 3200 --reversal-copies \
        --follow-steps 1500 --traits-per-response 1 2 --filler-sentences 0 1

1. Data: the demo's generator writes `--threads` threads whose responses state their authors'
   planted traits; the planted levels are the annotations (no LLM labels them: what this
   measures is the training, not the annotator, whose own accuracy its build report gives).
   The project's pairs, personas and assembly stages build AlignX train and AlignX_test
   (`--test-per-cell` examples per (dimension, direction) cell, 4-item personas, their
   threads left out of train).
2. The starting policy: the shipped tiny annotator (its weights bind each dimension's name to
   its cue words, Prompt #1), then, unless `--lm-epochs 0`, language-modelled on the train
   split's responses, chosen and rejected alike. The annotator's own LM head is near uniform
   over the vocabulary, so every response token carries the same DPO gradient and DPO fits
   each thread's wording (train reward accuracy up, held-out at chance); once the phrase bank
   is predictable, the gradient sits on the tokens that remain uncertain, which trait
   sentence comes next: where the persona should act. Both responses of every pair are
   modelled equally, so the start prefers neither (its accuracy is reported). Then, with
   `--follow-steps`, `profile_following_start` teaches it to read a persona, in the formats
   of the methods trained (P~ for PBA, a history of PAIR items for ICA), on the dimensions
   this AlignX never plants (a 2-layer policy does not learn that from a few hundred DPO or
   supervised steps). The reference is the same model.
3. DPO of PBA and ICA on the project's Ray Train path (`train.dpo_trainer.run_training`:
   TorchTrainer workers running TRL's DPOTrainer, `--deepspeed` for ZeRO-3 on CPU), on the
   examples `prepare_training_data` renders once on Ray Data; with `--reversal-copies` each
   is followed by its reversal (`TrainConfig.reversal_copies`).
4. The evaluation's rule (`evaluate.accuracy.run_evaluation`) on AlignX_test with the full
   persona (PBA: P~ from the items' directions), and on the reversed persona: accuracy with
   its 95 % Wilson interval, the flip rate, and the starting model's own accuracy. Beside them
   the cue-word oracle (`cue_oracle`): how often P~ and the responses' cue words alone rank
   chosen first, the ceiling of a policy that reads the prompt.

Prints a table; the last line is one JSON object (`pba_accuracy`, `ica_accuracy`,
`base_accuracy`, `pba_flip_rate`, `ica_flip_rate`, `n_test`, ...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cue_oracle(batch):
    """Per test example, whether its prompt alone decides it: the persona's P~ (its items'
    directions aggregated, as the evaluation's profile) dotted with each response's cue words
    (the phrase bank's high_cue +1, low_cue -1) ranks chosen above rejected. Its accuracy is
    what a policy that reads P~ and the cue words reaches; 1.0 says the data is not the limit."""
    import re

    import numpy as np
    import pyarrow as pa

    from alignx_ray.common import schema
    from alignx_ray.common.space import NEUTRAL, SPACE
    from alignx_ray.fixtures import synthetic

    cues = [(d["high_cue"], d["low_cue"]) for d in synthetic.phrase_bank()["dimensions"]]

    def poles(text: str) -> np.ndarray:
        words = set(re.findall(r"[a-z]+", text.lower()))
        return np.array([(high in words) - (low in words) for high, low in cues], float)

    correct = []
    for row in batch.to_pylist():
        items = (row[schema.UGC] or []) + (row[schema.PAIR] or [])
        profile = np.asarray(SPACE.aggregate_directions([i[schema.DIRECTION] for i in items])) - NEUTRAL
        correct.append(float(profile @ (poles(row[schema.CHOSEN]) - poles(row[schema.REJECTED]))) > 0)
    return pa.table({"correct": pa.array(correct, pa.bool_())})


def language_model_start(
    model_dir: str, train_dir: str, out_dir: str, epochs: float, batch: int = 32, lr: float = 1e-3
) -> dict:
    """The start, language-modelled on every chosen and rejected response of the train split
    (causal LM loss, AdamW, seeded order); saved with its tokenizer. Returns the step count and
    the first and last losses."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    table = pq.read_table(train_dir, columns=["chosen", "rejected"])
    texts = table["chosen"].to_pylist() + table["rejected"].to_pylist()
    encoded = [tokenizer(t + tokenizer.eos_token).input_ids for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = max(1, int(epochs * len(encoded) / batch))
    order = torch.cat([torch.randperm(len(encoded)) for _ in range(int(epochs) + 1)])
    model.train()
    losses = []
    for step in range(steps):
        rows = [encoded[i] for i in order[step * batch : (step + 1) * batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])  # masked
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    last = losses[-20:]
    return {"steps": steps, "loss_first": round(losses[0], 3), "loss_last": round(sum(last) / len(last), 3)}


def history_pairs(examples, rng, items: tuple[int, int] = (2, 4)) -> list[list[dict]]:
    """Per example, an ICA history of PAIR items that shows its own poles: for each item one
    of its non-neutral dimensions, chosen another example's response with the same pole
    there, rejected one with the opposite pole (the number of items drawn from `items`)."""
    import numpy as np

    from alignx_ray.common.space import NEUTRAL

    by_pole: dict[tuple[int, bool], list[int]] = {}
    for i, (_, _, direction) in enumerate(examples):
        for dim in np.flatnonzero(direction != NEUTRAL):
            by_pole.setdefault((int(dim), bool(direction[dim] > NEUTRAL)), []).append(i)
    histories = []
    for i, (_, _, direction) in enumerate(examples):
        dims = [int(d) for d in np.flatnonzero(direction != NEUTRAL)]
        history = []
        for n in range(int(rng.integers(items[0], items[1] + 1))):
            dim = dims[n % len(dims)]
            pole = bool(direction[dim] > NEUTRAL)
            same, opposite = (by_pole.get((dim, p)) for p in (pole, not pole))
            if len(same) < 2 or not opposite:
                continue
            k = int(rng.integers(len(same)))
            other = same[k] if same[k] != i else same[(k + 1) % len(same)]  # never the example itself
            chosen, rejected = examples[other], examples[rng.choice(opposite)]
            history.append({"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]})
        histories.append(history)
    return histories


def profile_following_start(
    model_dir: str,
    out_dir: str,
    corpus,
    templates,
    steps: int,
    methods: tuple[str, ...] = ("pba",),
    batch: int = 16,
    lr: float = 1e-3,
    lm_weight: float = 0.1,
    held_out: int = 256,
) -> dict:
    """The start taught to follow a persona, in the formats of `methods`, on the dimensions this
    AlignX never plants.

    A corpus of the same shape as `corpus` but planted only outside `corpus`'s dimensions
    (another seed) gives (post, response, levels). Its persona: for PBA the response's own
    levels as P~; for ICA a history of PAIR items showing those levels (`history_pairs`). The
    loss is -log sigmoid(log p(y | persona) - log p(y | reversed persona)) (P~ reversed, or the
    pairs' chosen and rejected swapped: the same response under both, so only reading the
    persona lowers it) plus `lm_weight` times y's mean token NLL under its persona; the
    methods take turns, `steps` each. An instruct model arrives able to follow a prompt; this
    gives the tiny one that ability, while AlignX_test's dimensions stay new to it (the start's
    own accuracy there is reported). Returns the step count, the first and last losses and,
    per method, how often the held-out responses are likelier under their persona."""
    from dataclasses import replace

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignx_ray.common import prompts
    from alignx_ray.common.space import NEUTRAL, SPACE, level_to_direction
    from alignx_ray.engines.logprobs import response_logprobs
    from alignx_ray.fixtures import synthetic

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outside = tuple(d for d in range(len(SPACE)) if d not in set(corpus.pool()))
    if not outside:
        raise ValueError("the corpus plants every dimension: none is left to teach profile-following on")
    shape = replace(corpus, planted_dimensions=outside, n_threads=3000, n_users=300, seed=corpus.seed + 1)
    examples = [(post, text, level_to_direction(levels)) for post, text, levels in synthetic.iter_examples(shape)]
    examples = [e for e in examples if (e[2] != NEUTRAL).any()]
    rng = np.random.default_rng(0)
    rng.shuffle(examples)
    histories = history_pairs(examples, np.random.default_rng(1)) if "ica" in methods else [[]] * len(examples)
    rows_ = [(*e, h) for e, h in zip(examples, histories)]
    held, train = rows_[:held_out], rows_[held_out:]

    def log_probs(rows, method: str, reverse: bool):
        """(B,) summed log p(response | persona or reversed persona) and (B,) response lengths."""
        if method == "pba":
            profiles = [SPACE.describe_direction(1 - d if reverse else d) for _, _, d, _ in rows]
            texts = [prompts.pba_prompt(tokenizer, templates, post, p) for (post, *_), p in zip(rows, profiles)]
        else:
            swap = lambda h: [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in h]  # noqa: E731
            texts = [
                prompts.ica_prompt(tokenizer, templates, post, [], swap(h) if reverse else h) for post, _, _, h in rows
            ]
        return response_logprobs(model, tokenizer, texts, [text for _, text, _, _ in rows])

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps * len(methods)):
        method = methods[step % len(methods)]
        rows = [train[i] for i in rng.choice(len(train), batch, replace=False)]
        own, length = log_probs(rows, method, reverse=False)
        reversed_, _ = log_probs(rows, method, reverse=True)
        loss = -torch.nn.functional.logsigmoid(own - reversed_).mean() - lm_weight * (own / length).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    follows = {}
    with torch.no_grad():
        for method in methods:
            rates = [
                (log_probs(held[i : i + 32], method, False)[0] > log_probs(held[i : i + 32], method, True)[0]).float()
                for i in range(0, len(held), 32)
            ]
            follows[method] = round(float(torch.cat(rates).mean()), 3)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    last = losses[-20:]
    return {
        "steps": steps,
        "methods": list(methods),
        "dimensions": len(outside),
        "loss_first": round(losses[0], 3),
        "loss_last": round(sum(last) / len(last), 3),
        "held_out_follows": follows,
    }


def main() -> None:
    from alignx_ray.fixtures import synthetic, tiny_annotator

    shape = synthetic.SyntheticConfig()  # the generator's response shape, the default here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2400, help="generated threads (about 5.5 responses each)")
    parser.add_argument("--seed", type=int, default=7, help="the corpus seed (not one the annotator was trained on)")
    parser.add_argument("--test-per-cell", type=int, default=8, help="AlignX_test examples per (dimension, direction)")
    parser.add_argument("--methods", nargs="+", default=["pba", "ica"], choices=["pba", "ica"])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8, help="examples per worker per step")
    parser.add_argument("--deepspeed", action="store_true", help="ZeRO-3 (configs/deepspeed/zero3.json); else DDP")
    parser.add_argument("--max-examples", type=int, default=None, help="train on the first n examples only")
    parser.add_argument(
        "--reversal-copies", action="store_true", help="also train on every example's reversal (Table 5's variant)"
    )
    parser.add_argument("--lm-epochs", type=float, default=2.0, help="language modelling of the start (0: none)")
    parser.add_argument(
        "--follow-steps", type=int, default=0, help="profile-following steps on the unplanted dimensions (0: none)"
    )
    parser.add_argument(
        "--traits-per-response", type=int, nargs=2, default=shape.traits_per_response, metavar=("LO", "HI")
    )
    parser.add_argument("--filler-sentences", type=int, nargs=2, default=shape.filler_sentences, metavar=("LO", "HI"))
    parser.add_argument("--out", help="also write the JSON object here")
    args = parser.parse_args()

    import ray

    from alignx_ray.build.assemble import run_assemble
    from alignx_ray.build.pairs import run_pairs
    from alignx_ray.build.personas import run_personas
    from alignx_ray.common import schema
    from alignx_ray.common.config import load_config
    from alignx_ray.common.raydata import init_ray
    from alignx_ray.evaluate.accuracy import run_evaluation
    from alignx_ray.run import RunConfig
    from alignx_ray.train.dpo_data import prepare_training_data
    from alignx_ray.train.dpo_trainer import run_training

    demo = load_config(RunConfig, ROOT / "configs" / "demo.yaml")  # the CPU settings
    work = Path(tempfile.mkdtemp(prefix="alignx-synthetic-"))
    seconds: dict[str, float] = {}
    started = time.time()

    def timed(name: str, fn):
        t0 = time.time()
        out = fn()
        seconds[name] = round(time.time() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
        return out

    init_ray(demo.ray)
    corpus = synthetic.SyntheticConfig(
        n_threads=args.threads,
        n_users=max(120, args.threads // 10),
        traits_per_response=tuple(args.traits_per_response),
        filler_sentences=tuple(args.filler_sentences),
        seed=args.seed,
    )
    responses = timed(
        "generate",
        lambda: ray.get(ray.remote(synthetic.write_planted_annotations).remote(corpus, work / "annotate" / "data")),
    )
    build = demo.build
    assemble = build.assemble.model_copy(update={"test_per_cell": args.test_per_cell, "test_max": None})
    timed("pairs", lambda: run_pairs(build.pairs, work / "annotate", work / "pairs"))
    timed("personas", lambda: run_personas(build.personas, work / "annotate", work / "pairs", work / "personas"))
    dataset = timed(
        "assemble",
        lambda: run_assemble(assemble, work / "annotate", work / "pairs", work / "personas", None, work / "dataset"),
    )

    test_columns = [schema.CHOSEN, schema.REJECTED, schema.UGC, schema.PAIR]
    test = ray.data.read_parquet(str(work / "dataset" / "test"), columns=test_columns)
    oracle = test.map_batches(cue_oracle, batch_format="pyarrow").mean("correct")
    print(f"cue-word oracle on AlignX_test: {oracle:.3f}", flush=True)

    start = str(tiny_annotator.shipped_annotator(corpus.planted_dimensions))
    if args.lm_epochs > 0:
        task = ray.remote(num_cpus=2)(language_model_start)
        lm_figures = timed(
            "lm_start",
            lambda: ray.get(
                task.remote(start, str(work / "dataset" / "train"), str(work / "lm_start"), args.lm_epochs)
            ),
        )
        start = str(work / "lm_start")
    if args.follow_steps > 0:
        task = ray.remote(num_cpus=2)(profile_following_start)
        follow_figures = timed(
            "follow_start",
            lambda: ray.get(
                task.remote(
                    start, str(work / "follow_start"), corpus, demo.prompts, args.follow_steps, tuple(args.methods)
                )
            ),
        )
        print(f"profile-following start: {follow_figures}", flush=True)
        start = str(work / "follow_start")
    dpo = demo.train.dpo.model_copy(
        update={
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "beta": args.beta,
            "per_device_batch": args.batch,
            "save_steps": 10**6,  # no intermediate checkpoint: the final model is what is scored
        }
    )
    evaluate = demo.evaluate.model_copy(
        update={
            "personas": ["all"],
            "history_sizes": [None],
            "reversal": True,
            "profile_source": "items",
            "max_examples": None,
        }
    )
    results: dict[str, dict] = {}
    for method in args.methods:
        config = demo.train.model_copy(
            update={
                "method": method,
                "dpo": dpo,
                "max_examples": args.max_examples,
                "reversal_copies": args.reversal_copies,
                "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json") if args.deepspeed else None,
            }
        )
        out = work / f"train_{method}"
        prepared = timed(
            f"{method}_prepare",
            lambda config=config, out=out: prepare_training_data(
                config, str(work / "dataset" / "train"), start, demo.prompts, out / "data"
            ),
        )
        trained, model = timed(
            f"{method}_train",
            lambda config=config, out=out: run_training(
                config, start, str(out / "data"), str((out / "ray").resolve()), out
            ),
        )
        figures = timed(
            f"{method}_evaluate",
            lambda method=method, model=model: run_evaluation(
                evaluate,
                str(work / "dataset" / "test"),
                method,
                model,
                start,
                work / f"evaluate_{method}",
                demo.prompts,
            ),
        )
        full, reversal = figures["persona"]["all"], figures["reversal"]["all"]
        base = figures["starting_model"]["persona"]["all"]
        results[method] = {
            "train_rows": prepared["rows"],
            "train_examples": prepared["examples"],
            "steps": trained.get("step"),
            "train_loss": trained.get("loss"),
            "train_reward_accuracy": trained.get("rewards/accuracies"),
            "accuracy": full["accuracy"],
            "ci95": full["ci95"],
            "n": full["n"],
            "reversed_accuracy": reversal["accuracy"],
            "flip_rate": reversal["flip_rate"],
            "base_accuracy": base["accuracy"],
            "base_ci95": base["ci95"],
        }

    summary = {
        "machine": "cpu",
        "threads": args.threads,
        "responses": responses,
        "labels": "planted levels (no annotator)",
        "starting_policy": "the shipped tiny annotator"
        + (f", language-modelled on the train responses ({lm_figures})" if args.lm_epochs > 0 else "")
        + (f", taught to follow P~ on the unplanted dimensions ({follow_figures})" if args.follow_steps > 0 else ""),
        "training_path": f"Ray Train TorchTrainer, {demo.train.num_workers} gloo workers, TRL DPOTrainer, "
        + ("ZeRO-3" if args.deepspeed else "DDP"),
        "train": dataset["train"],
        "n_test": dataset["test"],
        "oracle_accuracy": round(float(oracle), 4),
        "settings": {
            k: getattr(args, k)
            for k in (
                "epochs",
                "lr",
                "beta",
                "batch",
                "seed",
                "test_per_cell",
                "lm_epochs",
                "follow_steps",
                "reversal_copies",
                "traits_per_response",
                "filler_sentences",
            )
        },
        "methods": results,
        "seconds": seconds,
        "total_seconds": round(time.time() - started, 1),
    }
    for method, r in results.items():
        summary[f"{method}_accuracy"] = r["accuracy"]
        summary[f"{method}_ci95"] = r["ci95"]
        summary[f"{method}_flip_rate"] = r["flip_rate"]
    first = next(iter(results.values()))
    summary["base_accuracy"], summary["base_ci95"] = first["base_accuracy"], first["base_ci95"]

    print(f"\n{'method':8s} {'accuracy':>9s} {'95 % interval':>16s} {'flip rate':>10s} {'start':>7s}   n")
    for method, r in results.items():
        lo, hi = r["ci95"]
        print(
            f"{method:8s} {r['accuracy']:9.3f} {f'{lo:.3f}-{hi:.3f}':>16s} {r['flip_rate']:10.3f} "
            f"{r['base_accuracy']:7.3f} {r['n']:4d}"
        )
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
