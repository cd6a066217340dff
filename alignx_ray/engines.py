"""Scoring engines: (shared prefix, question branches) -> probabilities of the three options.

All engines take token ids, never text, so every engine scores exactly the same tokens:
- `TransformersTreeEngine`: the packed prefix tree (prefix once + all branches, tree mask).
- `TransformersPlainEngine`: one independent prompt per branch; the reference, and the naive
  cost the tree is measured against.
- `VllmEngine`: vLLM's offline engine with automatic prefix caching: each prefix is warmed by
  itself first, then all its branches are submitted together with `max_tokens=1` and the
  options' log-probabilities read back (restricted to the three tokens and renormalised).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from alignx_ray.config import Section
from alignx_ray.tree import branch_logits, pack_tree


@dataclass(frozen=True)
class ScoreRequest:
    """One response to label: its prompt prefix and one branch per question."""

    prefix: list[int]
    branches: list[list[int]]

    def unique_tokens(self) -> int:
        return len(self.prefix) + sum(map(len, self.branches))


class ScoringEngine(Protocol):
    name: str

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """One (n_branches, 3) float32 array of option probabilities per request."""


class EngineConfig(Section):
    """Which engine labels, and how it is set up.

    kind: `vllm` (production), `transformers` (packed tree) or `transformers-plain`.
    model: a local path or a model-store URI the cluster can read; None = the demo's annotator.
    dtype: torch dtype name; `auto` takes the model's own.
    device: for the transformers engines (`cuda` when a GPU is assigned, else `cpu`).
    max_tree_tokens: transformers tree engine packs requests into forward passes of at most
        this many tokens.
    vllm: extra keyword arguments for `vllm.LLM` (tensor_parallel_size, max_model_len,
        gpu_memory_utilization, max_num_seqs, enforce_eager, ...).
    vllm_env: environment for the engine process (the CPU build needs its KV-cache size).
    prefix_caching: vLLM's automatic prefix caching and the warm-up pass (off only to measure
        what sharing the prefix saves).
    """

    kind: Literal["vllm", "transformers", "transformers-plain"] = "vllm"
    model: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    max_tree_tokens: int = 16384
    vllm: dict = {
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
        "max_model_len": 2048,
        "max_num_seqs": 128,
    }
    vllm_env: dict[str, str] = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    prefix_caching: bool = True


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _option_probs(logits: torch.Tensor, option_ids: list[int]) -> np.ndarray:
    return torch.softmax(logits[:, option_ids].float(), -1).cpu().numpy()


class _TransformersEngine:
    def __init__(self, model_path: str, option_ids: list[int], pad_id: int, dtype: str = "float32",
                 device: str = "auto", max_tree_tokens: int = 16384):
        from transformers import AutoModelForCausalLM

        self.device = _device(device)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(self.device).eval()
        self.option_ids = option_ids
        self.pad_id = pad_id
        self.max_tree_tokens = max_tree_tokens


class TransformersTreeEngine(_TransformersEngine):
    name = "transformers-tree"

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        trees = [pack_tree(r.prefix, r.branches) for r in requests]
        out, batch, width = [], [], 0
        for tree in trees + [None]:
            # Flush when the padded batch would exceed the token budget (or at the end).
            if batch and (tree is None or max(width, len(tree)) * (len(batch) + 1) > self.max_tree_tokens):
                out += [_option_probs(lg, self.option_ids) for lg in branch_logits(self.model, batch, self.pad_id)]
                batch, width = [], 0
            if tree is not None:
                batch.append(tree)
                width = max(width, len(tree))
        return out


class TransformersPlainEngine(_TransformersEngine):
    name = "transformers-plain"

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        out = []
        for r in requests:
            logits = [self.model(input_ids=torch.tensor([r.prefix + b], device=self.device)).logits[0, -1]
                      for b in r.branches]
            out.append(_option_probs(torch.stack(logits), self.option_ids))
        return out


def load_vllm(model_path: str, dtype: str, engine_kwargs: dict | None, env: dict[str, str] | None, **defaults):
    """An offline `vllm.LLM`; `env` is set first (the CPU build reads its KV-cache size from it)."""
    for key, value in (env or {}).items():
        os.environ.setdefault(key, str(value))
    from vllm import LLM

    return LLM(model=model_path, dtype=dtype, **{"disable_log_stats": False, **defaults, **(engine_kwargs or {})})


class VllmGenerator:
    """Text generation with vLLM, optionally constrained to a JSON schema (structured outputs).

    Each prompt has its own seed, so a retry or a resumed run samples exactly as before.
    """

    def __init__(self, config: EngineConfig, model_path: str):
        self.llm = load_vllm(model_path, config.dtype, config.vllm, config.vllm_env,
                             enable_prefix_caching=config.prefix_caching)

    def generate(self, prompts: list[str], seeds: list[int], max_tokens: int, temperature: float,
                 json_schema: dict | None = None) -> list[tuple[str, bool]]:
        """(text, finished) per prompt; finished is False when cut at max_tokens."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=json_schema) if json_schema else None
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                 structured_outputs=structured) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].finish_reason != "length") for o in outputs]


class VllmEngine:
    name = "vllm"

    def __init__(self, model_path: str, option_ids: list[int], dtype: str = "float32",
                 engine_kwargs: dict | None = None, env: dict[str, str] | None = None, prefix_caching: bool = True):
        from vllm import SamplingParams

        self.llm = load_vllm(model_path, dtype, engine_kwargs, env, enable_prefix_caching=prefix_caching,
                             logprobs_mode="processed_logprobs")
        self.prefix_caching = prefix_caching
        self.option_ids = option_ids
        self.warm = SamplingParams(max_tokens=1, temperature=0.0)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(option_ids),
                                     allowed_token_ids=option_ids)
        # Per request of the last `score` call: prompt tokens of its branch prompts that the
        # prefix cache served (warm-up prompts not counted), None where vLLM does not say.
        self.cached_tokens: list[int | None] = []

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        if self.prefix_caching:  # warm every prefix first, so all its branches hit the cache
            self.llm.generate([{"prompt_token_ids": r.prefix} for r in requests], self.warm, use_tqdm=False)
        prompts = [{"prompt_token_ids": r.prefix + b} for r in requests for b in r.branches]
        outputs = iter(self.llm.generate(prompts, self.params, use_tqdm=False))
        result, self.cached_tokens = [], []
        for r in requests:
            rows, cached = [], []
            for _ in r.branches:
                output = next(outputs)
                logprobs = output.outputs[0].logprobs[0]
                rows.append([logprobs[t].logprob if t in logprobs else -np.inf for t in self.option_ids])
                cached.append(output.num_cached_tokens)
            result.append(torch.softmax(torch.tensor(rows, dtype=torch.float64), -1).float().numpy())
            self.cached_tokens.append(None if None in cached else sum(cached))
        return result

    def prefix_cache_hit_rate(self) -> float | None:
        """Share of prompt tokens served from the prefix cache, when the engine reports it."""
        try:
            metrics = {m.name: m for m in self.llm.get_metrics()}
            hits = metrics["vllm:prefix_cache_hits"].value
            queries = metrics["vllm:prefix_cache_queries"].value
            return hits / queries if queries else None
        except Exception:  # metrics are optional and vary across vLLM versions
            return None


def make_engine(config: EngineConfig, model_path: str, tokenizer) -> ScoringEngine:
    from alignx_ray.prompts import option_token_ids

    option_ids = option_token_ids(tokenizer)
    if config.kind == "vllm":
        return VllmEngine(model_path, option_ids, config.dtype, config.vllm, config.vllm_env, config.prefix_caching)
    cls = TransformersTreeEngine if config.kind == "transformers" else TransformersPlainEngine
    return cls(model_path, option_ids, tokenizer.pad_token_id, config.dtype, config.device, config.max_tree_tokens)
