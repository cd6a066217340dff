"""Packed prefix forests vs 90 independent prompts, side by side in one run, random weights.

The workload of paper-scale annotation: threads of 5 responses; every prompt starts with the
same few-shot block (250 tokens), a thread's responses share its post (300 tokens), each has
its own comment (150 tokens), so P = 700 prefix tokens; then D = 90 questions of Q = 40 tokens.
Measured on the same responses, in one process:
  - naive: every question its own prompt (`transformers-plain`, prompts batched);
  - forest + SDPA: many responses per pass, shared prefixes once, a dense tree mask;
  - forest + flex: the same forests with a FlexAttention block mask;
  - with --vllm, vLLM last (prefix caching, each response's 90 prompts submitted together), on
    a model of the same shape with vLLM's own random weights (`load_format: dummy`; the
    transformers model is freed first), so its time is comparable and its choices are not.
Each reports s/response, tokens/s (tokens actually computed, shared ones once) and model FLOP
utilisation (2 x non-embedding parameters x those tokens / s / --peak-tflops), and the share of
the naive path's argmax choices it reproduces. Nothing is downloaded: the model is a config
with random weights. The last line printed is one JSON object, also written to --out.

    python benchmarks/packed_scorer.py                   # a GPU: the Qwen2.5-14B shape in bf16
    python benchmarks/packed_scorer.py --shape tiny      # anywhere (float32 on CPU)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "tie_word_embeddings")
SHAPES = {
    "qwen2.5-14b": {**dict(zip(SHAPE_FIELDS, (152064, 5120, 13824, 48, 40, 8, False))), "rope_theta": 1e6},
    "qwen2.5-0.5b": dict(zip(SHAPE_FIELDS, (151936, 896, 4864, 24, 14, 2, True))),
    "tiny": dict(zip(SHAPE_FIELDS, (4096, 128, 512, 2, 4, 2, True))),
}
OPTION_IDS = [16, 17, 18]  # stand-ins for the answer tokens '1', '2', '3'


def workload(args, vocab: int):
    """ScoreRequests with the thread structure above, from seeded random tokens."""
    from alignx_ray.engines.scoring import ScoreRequest

    rng = np.random.default_rng(0)

    def tokens(n: int) -> list[int]:
        return rng.integers(100, vocab - 100, n).tolist()

    few_shot = tokens(args.few_shot)
    questions = [tokens(args.Q) for _ in range(args.D)]
    comment = args.P - args.few_shot - args.post
    requests = []
    for _ in range(args.threads):
        post = tokens(args.post)
        requests += [ScoreRequest(few_shot + post + tokens(comment), questions) for _ in range(args.per_thread)]
    return requests


def timed(engine, requests, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = engine.score(requests)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def time_vllm(args, config, requests, cuda: bool) -> float:
    import gc
    import tempfile

    from alignx_ray.common.config import load_config
    from alignx_ray.engines.scoring import VllmEngine
    from alignx_ray.run import RunConfig

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    # the GPU settings of the production config, or the CPU build's of the demo's
    config_file = "annotate-qwen14b.yaml" if cuda else "demo.yaml"
    engine_config = load_config(RunConfig, Path(__file__).parents[1] / "configs" / config_file).annotate.engine
    model_dir = tempfile.mkdtemp(prefix="alignx-vllm-shape-")
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(model_dir)  # the shape only: vLLM draws the weights
    engine = VllmEngine(
        model_dir,
        OPTION_IDS,
        args.dtype,
        {**engine_config.vllm, "load_format": "dummy", "skip_tokenizer_init": True},
        engine_config.vllm_env,
        prefix_caching=True,
    )
    timed(engine, requests[: args.per_thread], "cuda" if cuda else "cpu")  # warm-up
    _, t = timed(engine, requests, "cuda" if cuda else "cpu")
    return t / len(requests)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-14b" if cuda else "tiny")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--threads", type=int, default=16 if cuda else 4, help="threads of --per-thread responses")
    parser.add_argument("--per-thread", type=int, default=5)
    parser.add_argument("--P", type=int, default=700, help="prefix tokens per prompt")
    parser.add_argument("--few-shot", type=int, default=250)
    parser.add_argument("--post", type=int, default=300)
    parser.add_argument("--Q", type=int, default=40)
    parser.add_argument("--D", type=int, default=90)
    parser.add_argument("--pack-tokens", type=int, default=16384, help="tokens per forest forward pass")
    parser.add_argument("--naive-responses", type=int, default=2, help="responses timed on the naive path")
    parser.add_argument("--naive-prompts-per-pass", type=int, default=45)
    parser.add_argument("--attention", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex"])
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0 if cuda else None,
        help="the device's dense peak for --dtype (H100 SXM bf16: 989)",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also time vLLM (engine settings from configs/annotate-qwen14b.yaml on a GPU, the CPU defaults otherwise)",
    )
    parser.add_argument(
        "--out", default=None, help="result JSON (default: benchmarks/results/packed-scorer-<device>.json)"
    )
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignx_ray.engines.scoring import EngineConfig, TransformersPlainEngine, TransformersTreeEngine

    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    names = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}
    shape = {names.get(k, k): v for k, v in SHAPES[args.shape].items()}
    config = Qwen2Config(**shape, max_position_embeddings=32768)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    non_embedding = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )
    requests = workload(args, config.vocab_size)
    n = len(requests)
    figures = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "command": "python " + shlex.join(sys.argv),
        "shape": args.shape,
        "dtype": args.dtype,
        "P": args.P,
        "Q": args.Q,
        "D": args.D,
        "few_shot": args.few_shot,
        "post": args.post,
        "per_thread": args.per_thread,
        "responses": n,
        "non_embedding_params": non_embedding,
    }

    plain_config = EngineConfig(kind="transformers-plain", pack_tokens=args.naive_prompts_per_pass * (args.P + args.Q))
    naive_engine = TransformersPlainEngine(model, OPTION_IDS, 0, plain_config)
    timed(naive_engine, requests[:1], device)  # warm-up
    naive, t = timed(naive_engine, requests[: args.naive_responses], device)
    figures["naive_s_per_response"] = t / args.naive_responses
    naive_tokens = (args.P + args.Q) * args.D
    figures["naive_tokens_per_s"] = naive_tokens * args.naive_responses / t

    for attention in args.attention:
        engine = TransformersTreeEngine(
            model, OPTION_IDS, 0, EngineConfig(kind="transformers", attention=attention, pack_tokens=args.pack_tokens)
        )
        timed(engine, requests[: 2 * args.per_thread], device)  # warm-up: compiles, caches the few-shot block
        before = engine.tokens_computed
        out, t = timed(engine, requests, device)
        computed = engine.tokens_computed - before
        key = f"forest_{attention}"
        figures[f"{key}_s_per_response"] = t / n
        figures[f"{key}_tokens_per_s"] = computed / t
        if args.peak_tflops:
            figures[f"{key}_model_flop_utilisation"] = 2 * non_embedding * computed / t / (args.peak_tflops * 1e12)
        choices = np.stack(out[: args.naive_responses]).argmax(-1) == np.stack(naive).argmax(-1)
        figures[f"{key}_argmax_agreement"] = float(choices.mean())
        # engines give log-probs renormalised over the options: exp gives the probabilities
        figures[f"{key}_max_prob_difference"] = float(
            max(np.abs(np.exp(a) - np.exp(b)).max() for a, b in zip(out, naive))
        )
        del engine
    if args.vllm:
        del naive_engine, model
        figures["vllm_s_per_response"] = time_vllm(args, config, requests, cuda)

    best = min(args.attention, key=lambda a: figures[f"forest_{a}_s_per_response"])
    figures["attention"] = best
    figures["s_per_response"] = figures[f"forest_{best}_s_per_response"]
    figures["argmax_agreement"] = figures[f"forest_{best}_argmax_agreement"]
    figures["speedup_vs_naive"] = figures["naive_s_per_response"] / figures["s_per_response"]

    print(f"\n{'measure':40s} value")
    for key, value in figures.items():
        print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
    slug = figures["device"].lower().replace(" ", "-")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"packed-scorer-{slug}.json")
    out_path.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
