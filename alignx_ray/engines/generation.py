"""Text generation with vLLM: P_DEMO answers (Prompt #2), the judge, and the models it compares."""

from __future__ import annotations

from alignx_ray.engines.scoring import EngineConfig, engine_call, load_vllm

# JSON answers without free whitespace: the grammar otherwise admits unbounded whitespace, in
# which a weak model spends its tokens (the tiny demo model: ~45 % of a P_DEMO answer, and a
# weak judge all of max_tokens). vLLM reads this per engine, not per request; an engine config
# that names its own `structured_outputs_config` keeps it.
COMPACT_JSON = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


class VllmGenerator:
    """Text generation with vLLM, optionally constrained to a JSON schema (structured outputs).

    Each prompt has its own seed, so a retry or a resumed run samples exactly as before.
    """

    def __init__(self, config: EngineConfig, model_path: str):
        self.llm = load_vllm(
            model_path,
            config.dtype,
            {**COMPACT_JSON, **config.vllm},
            config.vllm_env,
            enable_prefix_caching=config.prefix_caching,
        )
        self.max_prompt_tokens = self.llm.model_config.max_model_len - 1  # room for one answer token at least

    def generate(
        self, prompts: list[str], seeds: list[int], max_tokens: int, temperature: float, json_schema: dict | None = None
    ) -> list[tuple[str, bool]]:
        """(text, finished) per prompt; finished is False when cut at max_tokens."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=json_schema) if json_schema else None
        params = [
            SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured_outputs=structured)
            for seed in seeds
        ]
        with engine_call():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].finish_reason != "length") for o in outputs]
