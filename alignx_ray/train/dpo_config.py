"""Configuration of DPO training for ICA and PBA (paper §5, Appendix C.2).

The defaults are the released AlignXpert settings (Appendix C.2): 8 GPUs, DeepSpeed ZeRO-3,
bf16, lr 5e-7, beta 0.1, global batch 128 (2 per device x 8 accumulation x 8 GPUs), max length
8192, one epoch, cosine to 0.1 x lr after 10 % warm-up, Adam (0.9, 0.95), no weight decay,
clipping 1.0, gradient checkpointing, flash-attn. `configs/train.yaml` names the model and
data of a cluster run; the CPU demo's values (a tiny model, 2 gloo workers) live in
`configs/demo.yaml`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from alignx_ray.common.config import PoolConfig, Section


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
    learning_rate: float = 5e-7
    epochs: float = 1
    per_device_batch: int = 2
    gradient_accumulation: int = 8
    max_length: int = 8192
    warmup_ratio: float = 0.1
    min_lr_rate: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    bf16: bool = True
    attn_implementation: str | None = "flash_attention_2"
    precompute_ref_log_probs: bool = False
    save_steps: int = 200
    logging_steps: int = 10
    seed: int = 0


class TrainConfig(Section):
    """A DPO run of one method.

    method: `ica` (behaviour history in context) or `pba` (the P~ description).
    model: the starting policy, a local path or model-store path (None: the demo's tiny
        model). The reference is the starting model. An earlier AlignXpert checkpoint works
        here too, which is how a space extended by config is learnt (paper §6.3).
    dataset: an AlignX parquet file or folder, ours or the released one (None: the run's
        `dataset/train`). max_examples: use the first n rows in file order (None: all).
    reversal_copies: also train on each example's reversal, the evaluation's Table 5 variant
        (PAIR items and target swapped, directions flipped, UGC and demographic text left out),
        so the persona alone decides which response is preferred; off in the paper, which
        measures the reversal but does not train on it.
    prepare: the Ray Data actors that render the examples once before training (batch_size:
        parquet row groups per call; each actor loads the tokenizer once).
    fit_sample: the fit accuracy is measured on the first n prepared examples (the
        evaluation's scorer actors score them: a bounded sample, no model in the driver).
    deepspeed: a DeepSpeed JSON (ZeRO-3 by default); None trains with plain DDP.
    num_workers / use_gpu / cpus_per_worker: the Ray Train worker group.
    storage_path: where Ray Train keeps checkpoints, local or s3:// (None: the run directory);
        a resubmitted job with the same storage path and name resumes from the latest.
    max_failures: worker-group failures (a worker process killed, its node lost) that Ray Train
        recovers from inside the same job, restarting every worker from the latest checkpoint
        (Ray Train's `FailureConfig`); -1: without limit; 0: the first fails the job.
    """

    method: Literal["ica", "pba"] = "ica"
    model: str | None = None
    dataset: str | None = None
    max_examples: int | None = None
    reversal_copies: bool = False
    prepare: PoolConfig = PoolConfig(batch_size=1, concurrency=(1, 8), num_cpus=1)
    fit_sample: PositiveInt = 512
    dpo: DPOSettings = DPOSettings()
    deepspeed: str | None = "configs/deepspeed/zero3.json"
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 8
    storage_path: str | None = None
    name: str | None = None  # None: "alignxpert-<method>"
    max_failures: int = 3
