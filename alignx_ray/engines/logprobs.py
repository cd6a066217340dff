"""Summed response log-probabilities: the DPO reward and the paper's alignment accuracy (§6).

Per example, the summed (not length-normalised) log-probability of the response tokens given
the prompt, under the policy and under the reference; reward = policy minus reference.
Training's fit accuracy and the evaluation's scorer actors both score through here.
"""

from __future__ import annotations

import numpy as np

SCORE_COLUMNS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")


def response_logprobs(model, tokenizer, prompts_: list[str], responses: list[str]):
    """One batch: (B,) summed log-probabilities of the response tokens given the prompt and (B,)
    response lengths, as tensors on the model's device that keep their gradient (a training loop
    backpropagates through them). Prompt and response are tokenized apart and concatenated, as
    TRL's DPO does."""
    import torch

    device = next(model.parameters()).device
    encoded = [
        (tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"])
        for p, r in zip(prompts_, responses)
    ]
    width = max(len(p) + len(r) for p, r in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(encoded):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        target[i, len(p) : len(p) + len(r)] = True
    ids, target = ids.to(device), target[:, 1:].to(device)
    logits = model(input_ids=ids, attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * target).sum(-1), target.sum(-1)


def summed_logprobs(model, tokenizer, prompts_: list[str], responses: list[str], batch_size: int = 8) -> np.ndarray:
    """Sum of the response tokens' log-probabilities given the prompt (not length-normalised):
    the quantity both the DPO reward and the paper's alignment accuracy are built on."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(prompts_), batch_size):
            sums, _ = response_logprobs(
                model, tokenizer, prompts_[start : start + batch_size], responses[start : start + batch_size]
            )
            out.append(sums.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def score_pairs(
    policy, reference, tokenizer, prompts_: list[str], chosen: list[str], rejected: list[str], batch_size: int = 8
) -> dict[str, np.ndarray]:
    """The four summed log-probs per pair; a reference that is the policy is scored once."""
    scores = {
        f"policy_{side}": summed_logprobs(policy, tokenizer, prompts_, texts, batch_size)
        for side, texts in (("chosen", chosen), ("rejected", rejected))
    }
    for side, texts in (("chosen", chosen), ("rejected", rejected)):
        scores[f"reference_{side}"] = (
            scores[f"policy_{side}"].copy()
            if reference is policy
            else summed_logprobs(reference, tokenizer, prompts_, texts, batch_size)
        )
    return scores


def reward_margin(scores) -> np.ndarray:
    """(policy - reference) on chosen minus the same on rejected; > 0 is correct."""
    s = {k: np.asarray(scores[k], np.float64) for k in SCORE_COLUMNS}
    return (s["policy_chosen"] - s["reference_chosen"]) - (s["policy_rejected"] - s["reference_rejected"])


def load_models(policy: str, reference: str, dtype: str = "auto"):
    """(policy, reference, tokenizer) on the GPU when there is one; the same path loads once.
    dtype `auto`: bfloat16 on a GPU, float32 on the CPU (which has no fast bfloat16 kernels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    torch_dtype = auto if dtype == "auto" else getattr(torch, dtype)

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()

    model = load(policy)
    return model, model if reference == policy else load(reference), AutoTokenizer.from_pretrained(policy)
