"""DPO training of ICA and PBA: Ray Train workers running TRL's DPOTrainer with DeepSpeed.

The examples are rendered once beforehand (`dpo_data.prepare_training_data`); each worker
opens those parquet parts as a memory-mapped Arrow dataset (`training_dataset`), trains with
`DPOTrainer` (sigmoid loss; DeepSpeed ZeRO-3 from `configs/deepspeed/`), and at every save
reports its own checkpoint folder to Ray Train, which merges the workers' files (model and
each rank's ZeRO shards) into one checkpoint in storage. A resubmitted run with the same
storage path and name gets the latest checkpoint back from Ray Train and resumes the
Trainer from it (optimizer, scheduler, data order, step). A worker that dies inside a job
(`TrainConfig.max_failures`) has Ray Train restart the worker group the same way, from the
latest checkpoint. The last report carries the final model and the training figures (loss,
reward accuracy and margins, and `restarts`: the worker-group restarts inside this job).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from alignx_ray.common.config import resolve_local
from alignx_ray.train.dpo_config import TrainConfig
from alignx_ray.train.dpo_data import prepared_parts

FINAL_MARKER = "alignx_final.json"
# In every checkpoint: the job that wrote it and how many times its worker group had started.
STARTS_FILE = "alignx_starts.json"
FIGURES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def training_dataset(prepared: str, cache_dir: Path):
    """The prepared examples as a Hugging Face `Dataset` memory-mapped from Arrow files in
    `cache_dir`, so a worker's memory does not grow with the data.

    Not Ray Train's `datasets=` shards: TRL's DPOTrainer tokenizes and samples a map-style
    `Dataset` itself, and its seeded sampler over the whole dataset in file order is what gives
    a resumed run the same data order; a streamed shard is an iterator whose blocks Ray Data
    hands to the workers as they ask for them, an order no run can repeat.
    """
    from datasets import Dataset

    columns = ["prompt", "chosen", "rejected"]
    return Dataset.from_parquet(prepared_parts(prepared), columns=columns, cache_dir=str(cache_dir))


def dpo_args(config: TrainConfig, output_dir: Path, deepspeed: dict | None):
    """TRL `DPOConfig` from our settings (created before the model: ZeRO-3 partitions at load)."""
    import torch
    from trl import DPOConfig

    s = config.dpo
    model_kwargs = {"dtype": torch.bfloat16 if s.bf16 else torch.float32}
    if s.attn_implementation:
        model_kwargs["attn_implementation"] = s.attn_implementation
    return DPOConfig(
        output_dir=str(output_dir),
        beta=s.beta,
        loss_type=["sigmoid"],
        learning_rate=s.learning_rate,
        num_train_epochs=s.epochs,
        per_device_train_batch_size=s.per_device_batch,
        gradient_accumulation_steps=s.gradient_accumulation,
        max_length=s.max_length,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": s.min_lr_rate},
        warmup_steps=s.warmup_ratio,
        adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        gradient_checkpointing=s.gradient_checkpointing,
        bf16=s.bf16,
        precompute_ref_log_probs=s.precompute_ref_log_probs,
        deepspeed=deepspeed,
        use_cpu=not config.use_gpu,
        save_strategy="steps",
        save_steps=s.save_steps,
        logging_steps=s.logging_steps,
        report_to="none",
        seed=s.seed,
        data_seed=s.seed,
        model_init_kwargs=model_kwargs,
        dataloader_num_workers=0,
    )


def latest_figures(log_history: list[dict]) -> dict:
    """The most recent value of each training figure in the Trainer's log."""
    figures = {}
    for entry in log_history:
        figures.update({k: float(v) for k, v in entry.items() if k in FIGURES})
    return figures


def group_starts(checkpoint_dir: Path | None, job: str) -> int:
    """How many times this job's worker group has started, this start included: one more than
    the latest checkpoint says when this job wrote it, else 1 (a new or resubmitted job)."""
    record = checkpoint_dir / STARTS_FILE if checkpoint_dir else None
    if record is None or not record.exists():
        return 1
    written = json.loads(record.read_text())
    return written["starts"] + 1 if written["job"] == job else 1


def train_loop(payload: dict) -> None:
    """One Ray Train worker (the function Ray Train runs on every worker). Its scratch folder
    (the Trainer's checkpoints, the memory-mapped data) is removed once its last report has
    uploaded what it keeps."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix=f"alignx-dpo-{rank}-"))
    try:
        train_in(scratch, payload, rank)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def train_in(scratch: Path, payload: dict, rank: int) -> None:
    import ray.train
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    config = TrainConfig.model_validate(payload["config"])
    checkpoint = ray.train.get_checkpoint()
    resume_from, resume_step, starts = None, 0, 1
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if (Path(d) / FINAL_MARKER).exists():  # finished before: report it again
                ray.train.report(json.loads((Path(d) / FINAL_MARKER).read_text()), checkpoint=None)
                return
            resume_from = scratch / "resume"
            shutil.copytree(d, resume_from)
            resume_step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"]
            starts = group_starts(resume_from, payload["job"])
    counted = {"job": payload["job"], "starts": starts}

    class ReportCheckpoints(TrainerCallback):
        """Every Trainer save becomes a Ray Train checkpoint (each rank reports its files; rank
        0 adds how many times this job's worker group has started)."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if rank == 0:
                (folder / STARTS_FILE).write_text(json.dumps(counted))
            metrics = {"step": state.global_step, "restarts": starts - 1, **latest_figures(state.log_history)}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    args = dpo_args(config, scratch / "out", payload["deepspeed"])
    tokenizer = AutoTokenizer.from_pretrained(payload["model"])
    examples = training_dataset(payload["prepared"], scratch / "datasets")
    trainer = DPOTrainer(
        model=payload["model"],
        args=args,
        processing_class=tokenizer,
        train_dataset=examples,
        callbacks=[ReportCheckpoints()],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = scratch / "final"
    trainer.save_model(str(final))  # collective under ZeRO-3: full weights gathered on rank 0
    figures = {
        "step": trainer.state.global_step,
        "examples": len(examples),
        "resumed_from_step": resume_step,
        "restarts": starts - 1,
        **latest_figures(trainer.state.log_history),
    }
    if rank == 0:
        tokenizer.save_pretrained(final)
        (final / FINAL_MARKER).write_text(json.dumps(figures))
    ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(final) if rank == 0 else None)


def run_training(config: TrainConfig, model: str, prepared: str, storage_path: str, out_dir: Path) -> tuple[dict, str]:
    """Run (or resume) DPO on Ray Train on the examples `prepare_training_data` wrote to
    `prepared` (a folder every worker can read); return (figures, `out_dir/model`, the final
    model)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    deepspeed = json.loads(Path(config.deepspeed).read_text()) if config.deepspeed else None  # read here: the
    # workers of a submitted job may run on nodes without this path
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(),
            "model": resolve_local(model),
            "prepared": resolve_local(prepared),
            "deepspeed": deepspeed,
            "job": uuid.uuid4().hex,  # tells this job's checkpoints from a resubmitted one's
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.name or f"alignxpert-{config.method}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    result = trainer.fit()
    final = out_dir / "model"
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(d, final)
    return dict(result.metrics), str(final)
