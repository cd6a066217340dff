"""Scoring engines: (shared prefix, question branches) -> log-probabilities of the three options.

All engines take token ids, never text, so every engine scores exactly the same tokens:
- `TransformersTreeEngine`: packed prefix forests: many responses per forward pass, every
  prefix they share laid out once, the prefix common to all (the few-shot block) computed once
  per engine and its keys and values reused; a dense tree mask (SDPA) or a block-sparse one
  (FlexAttention).
- `TransformersPlainEngine`: one independent prompt per branch; the reference, and the naive
  cost the tree is measured against.
- `VllmEngine`: vLLM's offline engine with automatic prefix caching: each prefix is warmed by
  itself first, then all its branches are submitted together with `max_tokens=1` and the
  options' log-probabilities read back (restricted to the three tokens).

Engines return log-probabilities, never probabilities: `engines.labelling` renormalises them
and rejects a response whose values are NaN, infinite or missing, rather than label it. A vLLM
engine that fails inside (its engine core dead, a step raising) raises `EngineFailure`, so its
actor is replaced rather than reused.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from alignx_ray.common.config import Section
from alignx_ray.common.prompts import option_token_ids
from alignx_ray.common.raydata import EngineFailure
from alignx_ray.engines.prefix_forest import (
    PackedForest,
    additive_mask,
    pack_forest,
    plan_packs,
    visibility_block_mask,
    visibility_mask,
)


@dataclass(frozen=True)
class ScoreRequest:
    """One response to label: its prompt prefix and one branch per question."""

    prefix: list[int]
    branches: list[list[int]]

    def unique_tokens(self) -> int:
        return len(self.prefix) + sum(map(len, self.branches))


class ScoringEngine(Protocol):
    name: str
    max_prompt_tokens: int | None  # the longest prompt it accepts (None: no limit of its own)

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """One (n_branches, 3) array of the options' log-probabilities per request (any
        constant per row aside), NaN for one the engine did not return."""


class EngineConfig(Section):
    """Which engine labels, and how it is set up.

    kind: `vllm`, `transformers` (packed prefix forests) or `transformers-plain` (90 prompts).
    model: a local path or a model-store URI the cluster can read; None = the run's annotator
        (the demo's tiny one when `annotate.engine.model` is not set either).
    Defaults are for a GPU node (bf16, FlexAttention, 16k-token packs); `configs/demo.yaml`
    carries the CPU build's settings.
    dtype: torch dtype name; `auto` takes the model's own.
    device: for the transformers engines (`cuda` when a GPU is assigned, else `cpu`).
    pack_tokens: the transformers engine packs responses into forward passes of at most this
        many tokens (shared prefixes counted once).
    attention: `sdpa` (a dense mask: fine on CPU and for small packs) or `flex` (FlexAttention
        with a block mask: unrelated responses' blocks are skipped; the GPU choice).
    reuse_shared_prefix: compute the prefix every request shares (the few-shot block) once
        and reuse its keys and values in every pack.
    vllm: extra keyword arguments for `vllm.LLM` (tensor_parallel_size, max_model_len,
        gpu_memory_utilization, max_num_seqs, enforce_eager, ...).
    vllm_env: environment for the engine process (the CPU build needs its KV-cache size).
    prefix_caching: vLLM's automatic prefix caching and the warm-up pass (off only to measure
        what sharing the prefix saves).
    """

    kind: Literal["vllm", "transformers", "transformers-plain"] = "vllm"
    model: str | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    pack_tokens: int = 16384
    attention: Literal["sdpa", "flex"] = "flex"
    reuse_shared_prefix: bool = True
    vllm: dict = {
        "tensor_parallel_size": 1,
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "max_num_seqs": 256,
    }
    vllm_env: dict[str, str] = {}
    prefix_caching: bool = True


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _option_logprobs(logits: torch.Tensor, option_ids: list[int]) -> np.ndarray:
    return torch.log_softmax(logits[:, option_ids].float(), -1).cpu().numpy()


@functools.cache
def attention_implementation(attention: str) -> str:
    """The transformers attention implementation for `EngineConfig.attention`. `flex` is
    FlexAttention taking the block mask we build, compiled once per process for static shapes
    (on CPU, inductor fails to recompile it for dynamic ones)."""
    if attention != "flex":
        return attention
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AttentionInterface

    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = compiled(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("alignx_flex", flex)
    return "alignx_flex"


def load_causal_lm(model_path: str, config: EngineConfig):
    from transformers import AutoModelForCausalLM

    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(_device(config.device))


class _TransformersEngine:
    """Holds a causal LM (loaded by `load_causal_lm`, or built in memory by a benchmark)."""

    max_prompt_tokens = None

    def __init__(self, model, option_ids: list[int], pad_id: int, config: EngineConfig, attention: str = "sdpa"):
        self.model = model.eval()
        self.attention = attention
        self.model.set_attn_implementation(attention_implementation(attention))
        self.device = next(model.parameters()).device
        self.option_ids = option_ids
        self.pad_id = pad_id
        self.config = config


class TransformersTreeEngine(_TransformersEngine):
    name = "transformers-tree"

    def __init__(self, model, option_ids: list[int], pad_id: int, config: EngineConfig):
        super().__init__(model, option_ids, pad_id, config, config.attention)
        self.shared: list[int] = []  # the cached common prefix and its (key, value) per layer
        self.shared_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tokens_computed = 0  # tokens run through the model (shared ones once, no padding)

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        if not requests:
            return []
        h = self._reuse_shared_prefix([r.prefix for r in requests]) if self.config.reuse_shared_prefix else 0
        rest = [(r.prefix[h:], r.branches) for r in requests]
        out: list[np.ndarray] = [None] * len(requests)
        for pack in plan_packs(rest, self.config.pack_tokens):
            for i, part in zip(pack, self._score_pack([rest[i] for i in pack], h)):
                out[i] = part
        return out

    def _score_pack(self, pack: list[tuple[list[int], list[list[int]]]], h: int) -> list[np.ndarray]:
        """Option log-probs of each (prefix, branches) of one pack. A NaN in one response (a bad
        weight its tokens reach) spreads to the whole pack through attention, where a masked key
        still adds 0 x NaN; such a pack is scored again one response at a time, so only the
        response it comes from gets NaN (and is rejected)."""
        forest = pack_forest(pack, position_offset=h)
        self.tokens_computed += len(forest)
        logprobs = _option_logprobs(self._branch_logits(forest, h), self.option_ids)
        parts = np.split(logprobs, np.cumsum(forest.counts)[:-1])
        if len(pack) > 1 and np.isnan(logprobs).any():
            return [part for one in pack for part in self._score_pack([one], h)]
        return parts

    def _reuse_shared_prefix(self, prefixes: list[list[int]]) -> int:
        """Length of the cached prefix that every request starts with. The cache only ever
        shrinks to what all requests so far share (a prefix's keys and values are those of the
        longer sequence, cut), and is refilled when nothing is shared."""
        keep = _common_prefix_length([self.shared, *prefixes]) if self.shared else 0
        if keep:
            self.shared = self.shared[:keep]
            self.shared_kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.shared_kv]
            return keep
        self.shared = prefixes[0][: _common_prefix_length(prefixes)]
        if self.shared:
            from transformers import DynamicCache

            h = len(self.shared)
            cache = DynamicCache()
            self.tokens_computed += h
            self._hidden(torch.tensor(self.shared), torch.arange(h), torch.arange(h), torch.full((h,), h), cache)
            self.shared_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return len(self.shared)

    def _branch_logits(self, forest: PackedForest, h: int) -> torch.Tensor:
        """(n_branches, vocab) logits at every branch end of one pack after h cached tokens."""
        from transformers import DynamicCache

        if self.attention == "flex":  # one length for all packs: each new length compiles again
            forest = forest.padded(max(self.config.pack_tokens, _round_up(len(forest), 128)), self.pad_id)
        t = len(forest)
        # Per key: the range of queries that see it; the cached prefix is seen by all.
        first = torch.cat([torch.zeros(h, dtype=torch.long), torch.arange(t)])
        end = torch.cat([torch.full((h,), t), forest.subtree_end])
        cache = DynamicCache(ddp_cache_data=self.shared_kv) if h else None
        hidden = self._hidden(forest.input_ids, forest.position_ids, first, end, cache)
        return self.model.lm_head(hidden[forest.last.to(self.device)])

    def _hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, first: torch.Tensor, end: torch.Tensor, cache
    ) -> torch.Tensor:
        """(T, hidden) last hidden states of one sequence whose key k is seen by the queries
        first[k] <= q < end[k] (keys: the cache's, then the sequence's own)."""
        t, first, end = len(ids), first.to(self.device), end.to(self.device)
        if self.attention == "flex":
            mask = visibility_block_mask(first, end, t)
        else:
            mask = additive_mask(visibility_mask(first, end, t), self.model.dtype)[None, None]
        return self.model.model(
            input_ids=ids[None].to(self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=mask,
            past_key_values=cache,
        ).last_hidden_state[0]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    n = min(map(len, sequences))
    first = sequences[0]
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TransformersPlainEngine(_TransformersEngine):
    """Every branch its own prompt `prefix + branch`; prompts batched up to `pack_tokens`
    (right-padded: causal attention never lets a real token see the padding after it)."""

    name = "transformers-plain"

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        out = []
        for r in requests:
            prompts = [r.prefix + b for b in r.branches]
            per_pass = max(1, self.config.pack_tokens // max(map(len, prompts)))
            logits = [self._last_logits(prompts[i : i + per_pass]) for i in range(0, len(prompts), per_pass)]
            out.append(_option_logprobs(torch.cat(logits), self.option_ids))
        return out

    def _last_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        width = max(map(len, prompts))
        ids = torch.tensor([p + [self.pad_id] * (width - len(p)) for p in prompts], device=self.device)
        real = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=self.device)
        hidden = self.model.model(input_ids=ids, attention_mask=real).last_hidden_state
        ends = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self.model.lm_head(hidden[torch.arange(len(prompts), device=self.device), ends])


def load_vllm(model_path: str, dtype: str, engine_kwargs: dict | None, env: dict[str, str] | None, **defaults):
    """An offline `vllm.LLM`; `env` is set first (the CPU build reads its KV-cache size from it,
    and VLLM_ENABLE_V1_MULTIPROCESSING puts the engine core in a process of its own or not)."""
    for key, value in (env or {}).items():
        os.environ[key] = str(value)
    from vllm import LLM

    return LLM(model=model_path, dtype=dtype, **{"disable_log_stats": False, **defaults, **(engine_kwargs or {})})


def vllm_engine_processes() -> list:
    """vLLM's engine core processes this process started (its multiprocess mode, the default
    on GPU nodes; none in the single-process CPU build): the engine is dead once one ends."""
    import psutil

    children = psutil.Process().children(recursive=True)
    return [c for c in children if "EngineCore" in c.name() + " ".join(c.cmdline())]


@contextlib.contextmanager
def engine_call():
    """A vLLM call whose failure inside the engine (vLLM's EngineDeadError when the engine core
    process died, any error of a step) becomes `EngineFailure`. A ValueError passes as it is:
    vLLM refuses a bad request (a prompt over max_model_len) before running it, and a fresh
    engine would refuse it too."""
    try:
        yield
    except ValueError:
        raise
    except Exception as e:
        raise EngineFailure(f"the vLLM engine failed: {type(e).__name__}: {e}") from e


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        option_ids: list[int],
        dtype: str = "float32",
        engine_kwargs: dict | None = None,
        env: dict[str, str] | None = None,
        prefix_caching: bool = True,
    ):
        from vllm import SamplingParams

        self.llm = load_vllm(
            model_path,
            dtype,
            engine_kwargs,
            env,
            enable_prefix_caching=prefix_caching,
            logprobs_mode="processed_logprobs",
        )
        self.prefix_caching = prefix_caching
        self.option_ids = option_ids
        self.max_prompt_tokens = self.llm.model_config.max_model_len - 1  # its one answer token must fit too
        self.warm = SamplingParams(max_tokens=1, temperature=0.0)
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=len(option_ids), allowed_token_ids=option_ids
        )
        # Per request of the last `score` call: prompt tokens of its branch prompts that the
        # prefix cache served (warm-up prompts not counted), None where vLLM does not say.
        self.cached_tokens: list[int | None] = []

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        prompts = [{"prompt_token_ids": r.prefix + b} for r in requests for b in r.branches]
        with engine_call():
            if self.prefix_caching:  # warm every prefix first, so all its branches hit the cache
                self.llm.generate([{"prompt_token_ids": r.prefix} for r in requests], self.warm, use_tqdm=False)
            outputs = iter(self.llm.generate(prompts, self.params, use_tqdm=False))
        result, self.cached_tokens = [], []
        for r in requests:
            rows, cached = [], []
            for _ in r.branches:
                output = next(outputs)
                steps = output.outputs[0].logprobs
                logprobs = steps[0] if steps else {}
                rows.append([logprobs[t].logprob if t in logprobs else np.nan for t in self.option_ids])
                cached.append(output.num_cached_tokens)
            result.append(np.array(rows, np.float64))
            self.cached_tokens.append(None if None in cached else sum(cached))
        return result


def make_engine(config: EngineConfig, model_path: str, tokenizer) -> ScoringEngine:
    option_ids = option_token_ids(tokenizer)
    if config.kind == "vllm":
        return VllmEngine(model_path, option_ids, config.dtype, config.vllm, config.vllm_env, config.prefix_caching)
    cls = TransformersTreeEngine if config.kind == "transformers" else TransformersPlainEngine
    return cls(load_causal_lm(model_path, config), option_ids, tokenizer.pad_token_id, config)
