"""SFT stage: teach a model the task's response format through TRL's SFTTrainer.

Objective: next-token cross-entropy on the completion (the assistant turn) only, over
prompt/completion rows rendered by the one prompt renderer. The tiny default learns the synthetic
traces from scratch, including rows whose prompt carries a privileged block, which is how it
learns to use a reference solution; a real model is fine-tuned on problem + solution data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from opsdlab.config.choices import BATCHING
from opsdlab.config.stages import SFTStageConfig
from opsdlab.tasks.data import Example
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import evaluate
from opsdlab.modeling.padding import left_aligned
from opsdlab.stages.progress import SFT_POSTFIX, train_stage
from opsdlab.modeling.runtime import (JsonlMetrics, check_world_size, common_training_args, launch_processes, read_jsonl,
                                      save_trained, warn_if_updates_vanish)
from opsdlab.tasks.verifier import VerifierConfig

def sft_args(config: SFTStageConfig, stage_dir: Path, seed: int, eos_token: str, *,
             num_processes: int | None = None) -> SFTConfig:
    """TRL's SFTConfig from the stage config; `num_processes` defaults to the launch's."""
    num_processes = launch_processes() if num_processes is None else num_processes
    args = SFTConfig(
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch(num_processes),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=int(config.warmup_ratio * config.max_steps),
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        completion_only_loss=True,
        train_sampling_strategy=BATCHING[config.batching],  # `choices.BATCHING`
        gradient_checkpointing=config.gradient_checkpointing,
        eos_token=eos_token,
        dataset_num_proc=None,
        **common_training_args(stage_dir, seed=seed, save_steps=config.save_steps,
                               logging_steps=config.logging_steps, report_to=config.report_to),
    )
    check_world_size(args, num_processes, "sft")
    return args


class TeacherProbe(TrainerCallback):
    """Accuracy (avg@k; greedy by default) of the student prompt and of each teacher context on
    held-out problems, every `every` optimizer steps, appended to `path` (one JSON line per step and
    context).

    The main process alone generates; the others wait for it at the next step's gradient exchange.
    Weights sharded over processes (DeepSpeed ZeRO-3, FSDP) would need every process to generate, so
    the probe refuses them.
    Generation seeds torch's random generator, so the probe runs inside a forked RNG state: a probed
    run trains on exactly the batches of an unprobed one. A resumed run skips the steps already in
    `path`.
    """

    def __init__(self, path: Path, examples: list[Example], verifier: VerifierConfig, contexts: list[str], *,
                 every: int, thinking: bool = True, max_new_tokens: int = 192, k: int = 1,
                 temperature: float = 0.0):
        self.path, self.examples, self.verifier, self.contexts = Path(path), examples, verifier, contexts
        self.every, self.thinking = every, thinking
        self.sampling = SamplingConfig(k=k, temperature=temperature, max_new_tokens=max_new_tokens)
        self.done = {record["step"] for record in read_jsonl(self.path)}  # probed before a resume

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1 and (args.deepspeed or args.fsdp):
            raise ValueError("sft.probe_every: the SFT probe generates on the main process alone, which needs "
                             "whole weights on it; set sft.probe_every=0 with DeepSpeed or FSDP")

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if not state.is_world_process_zero or step % self.every or step in self.done:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            records = [self.probe(model, processing_class, step, context) for context in self.contexts]
        with open(self.path, "a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        self.done.add(step)

    def probe(self, model, tokenizer, step: int, context: str) -> dict:
        _, summary = evaluate(model, tokenizer, self.examples, self.verifier, self.sampling, thinking=self.thinking,
                              context=context, desc=f"sft probe {context} @{step}")
        return {"step": step, "context": context, "accuracy": summary["avg_at_k"],
                "mean_tokens": summary["mean_response_tokens"], "problems": len(self.examples),
                "k": self.sampling.k, "temperature": self.sampling.temperature}


class SFTStageTrainer(SFTTrainer):
    """TRL's SFTTrainer whose loss forward over a padded batch runs without a tokens x tokens attention
    mask (`padding.left_aligned`): memory linear in `max_length`."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        with left_aligned(model):
            return super().compute_loss(model, inputs, *args, **kwargs)


def run_sft(model, tokenizer, rows: list[dict], config: SFTStageConfig, stage_dir: Path, seed: int = 0,
            callbacks: list[TrainerCallback] = ()) -> Path:
    """Train on `rows` (prompt, completion), resume from a checkpoint if one exists, save to stage_dir/model.

    Logged numbers go to stage_dir/metrics.jsonl; the terminal shows an "sft" bar with the loss.
    """
    stage_dir = Path(stage_dir)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = sft_args(config, stage_dir, seed, tokenizer.eos_token)
    trainer = SFTStageTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl"), *callbacks])
    warn_if_updates_vanish(trainer, "sft")
    train_stage(trainer, stage_dir, "sft", SFT_POSTFIX)
    return save_trained(trainer, stage_dir / "model")
