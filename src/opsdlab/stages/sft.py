"""SFT stage: teach a model the task's response format through TRL's SFTTrainer.

Objective: next-token cross-entropy on the completion (the assistant turn) only, over
prompt/completion rows rendered by the one prompt renderer. The tiny default learns the synthetic
traces from scratch, including rows whose prompt carries a privileged block, which is how it
learns to use a reference solution; a real model is fine-tuned on problem + solution data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from opsdlab.tasks.data import Example
from opsdlab.evaluation.evaluate import SamplingConfig, evaluate
from opsdlab.stages.progress import SFT_POSTFIX, train_stage
from opsdlab.modeling.runtime import (JsonlMetrics, check_ranges, check_world_size, common_training_args, launch_processes,
                             per_device_rows, read_jsonl, save_trained, warn_if_updates_vanish)
from opsdlab.tasks.verifier import VerifierConfig

# How rows are drawn into batches: named choice -> the Trainer's `train_sampling_strategy`.
# `random`: each micro-batch is rows drawn at random, padded to its longest row.
# `length_grouped` puts rows of similar length together (less padding, cheaper steps on a CPU;
# benchmarks/sft_step_time.py) at the cost of batches that are less random: where length tells the
# kind of row apart (the tiny task's privileged rows are the long ones) it trains a much worse model.
# `rebalanced` (transformers' BatchRebalanceSampler) keeps each optimizer step a random draw of
# `batch_size` rows and splits only that step's rows by length into its gradient-accumulation
# micro-batches; the loss is normalised over the whole step, so the step's gradient is the one of its
# rows in a single batch, with less padding. It needs gradient_accumulation_steps > 1 (or several
# processes) to split anything. Its shuffle is transformers' own (seed 42 + epoch), over rows drawn
# from the run's seed.
BATCHING = {"random": "random", "length_grouped": "group_by_length", "rebalanced": "batch_rebalance"}


@dataclass(frozen=True)
class SFTStageConfig:
    """SFT settings. `batch_size` counts rows per optimizer step over all processes and
    gradient-accumulation steps; the per-device micro-batch is batch_size / (num_processes x
    gradient_accumulation_steps), which must divide evenly."""

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
    batching: str = "random"
    # Every `probe_every` steps (0: never) the pipeline grades answers to `probe_problems` held-out
    # problems from the student prompt and from the OPSD teacher's prompt (`TeacherProbe`): when,
    # during SFT, the model learns to use the privileged context. Greedy by default; `probe_k`
    # samples at `probe_temperature` show what greedy hides once the student's greedy answers are
    # good (a reading teacher stays accurate under sampling, a student does not).
    probe_every: int = 0
    probe_problems: int = 100
    probe_k: int = 1
    probe_temperature: float = 0.0

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ValueError(f"sft: batching must be one of {sorted(BATCHING)}, got {self.batching!r}")
        if min(self.rows, self.max_steps, self.batch_size, self.gradient_accumulation_steps) < 1:
            raise ValueError("sft: rows, max_steps, batch_size and gradient_accumulation_steps must be >= 1")
        if self.probe_every < 0 or self.probe_problems < 1 or self.probe_k < 1 or self.probe_temperature < 0:
            raise ValueError(f"sft: need probe_every >= 0, probe_problems >= 1, probe_k >= 1 and "
                             f"probe_temperature >= 0, got {self.probe_every}, {self.probe_problems}, "
                             f"{self.probe_k} and {self.probe_temperature}")
        check_ranges("sft", self)

    def per_device_batch(self, num_processes: int) -> int:
        """Rows per device per micro-batch on `num_processes` processes (an error if uneven)."""
        return per_device_rows("sft", self.batch_size, f"batch_size ({self.batch_size})", num_processes,
                               self.gradient_accumulation_steps)


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
        train_sampling_strategy=BATCHING[config.batching],
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


def run_sft(model, tokenizer, rows: list[dict], config: SFTStageConfig, stage_dir: Path, seed: int = 0,
            callbacks: list[TrainerCallback] = ()) -> Path:
    """Train on `rows` (prompt, completion), resume from a checkpoint if one exists, save to stage_dir/model.

    Logged numbers go to stage_dir/metrics.jsonl; the terminal shows an "sft" bar with the loss.
    """
    stage_dir = Path(stage_dir)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = sft_args(config, stage_dir, seed, tokenizer.eos_token)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl"), *callbacks])
    warn_if_updates_vanish(trainer, "sft")
    train_stage(trainer, stage_dir, "sft", SFT_POSTFIX)
    return save_trained(trainer, stage_dir / "model")
