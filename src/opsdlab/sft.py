"""SFT stage: teach a model the task's response format through TRL's SFTTrainer.

Objective: next-token cross-entropy on the completion (the assistant turn) only, over
prompt/completion rows rendered by the one prompt renderer. The tiny default learns the synthetic
traces from scratch, including rows whose prompt carries a privileged block, which is how it
learns to use a reference solution; a real model is fine-tuned on problem + solution data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from opsdlab.models import save_policy
from opsdlab.runtime import JsonlMetrics, common_training_args, resume_point


@dataclass(frozen=True)
class SFTStageConfig:
    rows: int = 8000
    max_steps: int = 800
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 512
    save_steps: int = 100
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    report_to: str = "none"

    def __post_init__(self):
        if self.rows < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("sft: rows, max_steps and batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"sft: learning_rate must be > 0, got {self.learning_rate}")


def run_sft(model, tokenizer, rows: list[dict], config: SFTStageConfig, stage_dir: Path, seed: int = 0) -> Path:
    """Train on `rows` (prompt, completion), resume from a checkpoint if one exists, save to stage_dir/model."""
    stage_dir = Path(stage_dir)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = SFTConfig(
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=int(config.warmup_ratio * config.max_steps),
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        completion_only_loss=True,
        gradient_checkpointing=config.gradient_checkpointing,
        eos_token=tokenizer.eos_token,
        dataset_num_proc=None,
        **common_training_args(stage_dir, seed=seed, save_steps=config.save_steps,
                               logging_steps=config.logging_steps, report_to=config.report_to),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl")])
    trainer.train(resume_from_checkpoint=resume_point(stage_dir))
    return save_policy(trainer.model, tokenizer, stage_dir / "model")
