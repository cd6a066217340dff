"""Configuration of DPO training for ICA and PBA (paper §5, Appendix C.2).

Defaults serve the CPU demo (a tiny model, 2 gloo workers, DeepSpeed ZeRO-3 on CPU);
`configs/train-ica.yaml` and `configs/train-pba.yaml` carry the released values
(Llama-3.1-8B-Instruct, 8 GPUs, lr 5e-7, beta 0.1, global batch 128, max length 8192).
"""

from __future__ import annotations

from typing import Literal

from alignx_ray.config import Section


class DPOSettings(Section):
    """TRL `DPOConfig` values.

    Loss: beta (the DPO temperature), sigmoid loss.
    Optimisation: learning_rate, epochs, per_device_batch x gradient_accumulation x workers
        = the global batch; cosine decay to min_lr_rate x lr after warmup_ratio of the steps;
        Adam betas, no weight decay, gradient clipping max_grad_norm.
    Memory: max_length (prompt + response tokens), gradient_checkpointing, bf16,
        attn_implementation (`flash_attention_2` on GPUs with flash-attn installed).
    Reference: precompute_ref_log_probs computes the reference's log-probs once up front
        instead of keeping the reference model beside the policy.
    Checkpoints: save_steps (also a Ray Train checkpoint); logging_steps.
    """

    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: float = 30
    per_device_batch: int = 4
    gradient_accumulation: int = 1
    max_length: int = 2048
    warmup_ratio: float = 0.1
    min_lr_rate: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    attn_implementation: str | None = None
    precompute_ref_log_probs: bool = False
    save_steps: int = 20
    logging_steps: int = 5
    seed: int = 0


class TrainConfig(Section):
    """A DPO run of one method.

    method: `ica` (behaviour history in context) or `pba` (the P~ description).
    model: the starting policy, a local path or model-store path (None: the demo's tiny
        model). The reference is the starting model. An earlier AlignXpert checkpoint works
        here too, which is how a space extended by config is learnt (paper §6.3).
    dataset: an AlignX parquet file or folder, ours or the released one (None: the run's
        `dataset/train`). max_examples: use the first n (None: all).
    deepspeed: a DeepSpeed JSON (ZeRO-3 by default); None trains with plain DDP.
    num_workers / use_gpu / cpus_per_worker: the Ray Train worker group.
    storage_path: where Ray Train keeps checkpoints, local or s3:// (None: the run directory);
        a resubmitted job with the same storage path and name resumes from the latest.
    """

    method: Literal["ica", "pba"] = "ica"
    model: str | None = None
    dataset: str | None = None
    max_examples: int | None = None
    dpo: DPOSettings = DPOSettings()
    deepspeed: str | None = "configs/deepspeed/zero3.json"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1
    storage_path: str | None = None
    name: str | None = None  # None: "dpo-<method>"
