"""RLVR stage: GRPO-family RL with the project's verifier as the reward, through TRL's GRPOTrainer.

Objective: the clipped policy-gradient surrogate of GRPO with group-centred advantages, loss
aggregation `dapo` (token-level), `grpo` (per sequence) or `dr_grpo` (constant normalizer), optional
clip-higher, KL to a reference (off by default) and masking of truncated completions: all TRL's.
This module adds one thing TRL lacks: dynamic sampling (DAPO), which drops groups whose rewards are
all equal (they carry no advantage) and refills the batch with fresh groups, consistently across
processes. The OPSD stage reuses its refill machinery for steps whose gate keeps too little.

With a length-aware reward (`run_rlvr(length_reward=...)`, the `length_rl` compaction method) the
correctness reward becomes one of `rewards.LENGTH_REWARDS` against a target length in tokens, set
once before training (`decide_length_target`) and kept in the stage folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from opsdlab.config.ranges import rollouts_per_device
from opsdlab.config.stages import VLLM_FIELDS, RLVRStageConfig, VLLMGeneration
from opsdlab.stages.checks import attach_checks, train_checked
from opsdlab.tasks.data import Example
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import Generation, generate, response_length
from opsdlab.modeling.models import end_token_ids
from opsdlab.modeling.padding import left_aligned
from opsdlab.stages.progress import RLVR_POSTFIX, train_stage
from opsdlab.stages.rollout_budget import RolloutBudget, checkpoint_tokens, save_checkpoint_tokens
from opsdlab.tasks.prompts import render_prompt
from opsdlab.loss.rewards import LENGTH_REWARDS, LengthAwareReward, VerifierReward, format_reward
from opsdlab.modeling.runtime import (JsonlMetrics, check_world_size, common_training_args, launch_processes, main_decides,
                                      precision_kwargs, process_device, save_trained, warn_if_updates_vanish)
from opsdlab.tasks.verifier import VerifierConfig
from opsdlab.evaluation.vllm_backend import colocated_engine_released, keep_cpu_weights_syncable

# Per-row tensors padded on the left (prompt side); every other 2-D per-row tensor is right-padded.
LEFT_PADDED = ("prompt_ids", "prompt_mask", "teacher_prompt_ids", "teacher_prompt_mask", "contrast_prompt_ids",
               "contrast_prompt_mask")


# Continuous batching on CPU: TRL sizes the paged cache as a share of the device's memory, which on
# CPU is all of the machine's RAM; grpo_args sizes it for the generation batch instead.
PAGED_CPU_PAGE_SIZE = 32
PAGED_CPU_PROMPT_TOKENS = 512


def generation_backend(config: VLLMGeneration) -> str:
    """The backend a stage config asks for: its `generation_backend`, or "vllm" under `use_vllm`."""
    return "vllm" if config.use_vllm else config.generation_backend


def grpo_args(config: RLVRStageConfig, stage_dir: Path, seed: int, *, rollouts_per_prompt: int | None = None,
              num_processes: int | None = None, stage: str = "rlvr", **extra) -> GRPOConfig:
    """GRPOConfig from the stage config, with `prompts_per_step` counted per optimizer step.

    per_device_train_batch_size = prompts_per_step x rollouts / (num_processes x gradient accumulation
    steps); TRL then generates one batch of prompts_per_step x rollouts rollouts per optimizer step
    (generation_batch_size, steps_per_generation = gradient_accumulation_steps) and splits it into
    the micro-batches. `num_processes` defaults to the launch's (`runtime.launch_processes`).

    `rollouts_per_prompt` replaces `config.group_size` (OPSD's setting). With 1 rollout per prompt,
    TRL's GRPOConfig would refuse (it asks num_generations >= 2, for group advantages that OPSD does
    not use): it is validated with a placeholder group that divides the generation batch and then
    handed num_generations = 1, so that the trainer's sampler does not repeat prompts, its reward
    normalisation takes groups of 1 (zero advantages) and vLLM's server mode asks one completion of
    each prompt.
    """
    rollouts = config.group_size if rollouts_per_prompt is None else rollouts_per_prompt
    num_processes = launch_processes() if num_processes is None else num_processes
    per_device = rollouts_per_device(stage, config.prompts_per_step, rollouts, num_processes,
                                     config.gradient_accumulation_steps)
    generations = rollouts
    if rollouts == 1:
        prompts = config.prompts_per_step  # = TRL's generation batch
        if prompts < 2:
            raise ValueError(f"{stage}: one rollout per prompt needs prompts_per_step >= 2, got {prompts}")
        generations = next(d for d in range(2, prompts + 1) if prompts % d == 0)
    args = GRPOConfig(
        max_steps=config.max_steps,
        per_device_train_batch_size=per_device,
        num_generations=generations,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        loss_type=config.loss_type,
        scale_rewards=config.scale_rewards,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        mask_truncated_completions=config.mask_truncated_completions,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        num_iterations=config.num_iterations,
        gradient_checkpointing=config.gradient_checkpointing,
        **generation_args(config, per_device * config.gradient_accumulation_steps),
        reward_weights=[1.0, config.format_reward_weight] if config.format_reward_weight else None,
        **common_training_args(stage_dir, seed=seed, save_steps=config.save_steps,
                               logging_steps=config.logging_steps, report_to=config.report_to),
        **extra,
    )
    check_world_size(args, num_processes, stage)
    if rollouts == 1:
        args.num_generations = 1
    return args


def generation_args(config: VLLMGeneration, rows: int) -> dict:
    """GRPOConfig's generation switches for a stage config that generates `rows` rollouts per process
    per generation batch: the vLLM fields passed through, `use_vllm` and
    `use_transformers_continuous_batching` set from the backend. Continuous batching on CPU gets a
    paged cache sized for the batch (prompts of up to PAGED_CPU_PROMPT_TOKENS; a longer one waits for
    free pages) rather than TRL's share of all the machine's RAM."""
    backend = generation_backend(config)
    args = {name: getattr(config, name) for name in VLLM_FIELDS if name != "generation_backend"}
    args["use_vllm"] = backend == "vllm"
    if backend == "paged":
        args["use_transformers_continuous_batching"] = True
        if precision_kwargs()["use_cpu"]:
            pages = math.ceil((PAGED_CPU_PROMPT_TOKENS + config.max_completion_length) / PAGED_CPU_PAGE_SIZE)
            args["transformers_continuous_batching_config"] = {
                "page_size": PAGED_CPU_PAGE_SIZE, "num_blocks": rows * pages,
                "max_batch_tokens": rows * PAGED_CPU_PAGE_SIZE}
    return args


def rl_dataset(examples, tokenizer, thinking: bool) -> Dataset:
    """Rows with the rendered student prompt plus the fields later stages need."""
    return Dataset.from_list([
        {"prompt": render_prompt(tokenizer, ex, thinking=thinking), "answer": ex.answer, "problem": ex.problem,
         "solution": ex.solution, "id": ex.id, "instruction": ex.instruction}
        for ex in examples
    ])


def reward_functions(verifier: VerifierConfig, tokenizer, config: RLVRStageConfig, model=None) -> list:
    """The verifier reward (grading and truncation, with the ids that end `model`'s responses), plus
    the format reward when weighted."""
    eos = end_token_ids(tokenizer, model)
    funcs = [VerifierReward(verifier, eos)]
    if config.format_reward_weight:
        funcs.append(format_reward)
    return funcs


# ---------------------------------------------------------------- length target

LENGTH_TARGET_FILE = "length_target.json"
# Training problems the starting checkpoint answers once to measure its lengths.
LENGTH_TARGET_PROBLEMS = 64


def quantile_length(lengths: list[int], quantile: float) -> int:
    """The smallest of `lengths` that at least a `quantile` fraction of them do not exceed (nearest
    rank: sorted lengths, entry ceil(quantile x n)); always one of the measured lengths."""
    if not lengths:
        raise ValueError("length target: no response lengths to take a quantile of")
    ordered = sorted(lengths)
    return ordered[max(math.ceil(quantile * len(ordered)) - 1, 0)]


def measure_lengths(model, tokenizer, examples: list[Example], config: RLVRStageConfig, *, thinking: bool,
                    seed: int) -> list[Generation]:
    """One response of the model to each of the first `LENGTH_TARGET_PROBLEMS` problems, sampled as
    training samples them (the stage's temperature, top_p and max_completion_length)."""
    sampling = SamplingConfig(k=1, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_completion_length, seed=seed)
    prompts = [render_prompt(tokenizer, ex, thinking=thinking) for ex in examples[:LENGTH_TARGET_PROBLEMS]]
    return generate(model.to(process_device()), tokenizer, prompts, sampling, desc="length target")


def decide_length_target(model, tokenizer, examples: list[Example], config: RLVRStageConfig, stage_dir: Path, *,
                         reward: str, given: int | None, quantile: float, thinking: bool, seed: int) -> int:
    """The target length of a length-aware reward, the same on every process.

    `given` if set; else the `quantile` (`quantile_length`) of the starting checkpoint's response
    lengths on training problems (`measure_lengths`). The main process decides and writes
    stage_dir/length_target.json; a later run in the same stage folder (a resumed one) reuses it
    rather than measure a model that has moved, and refuses settings that would set another target.
    """
    path = Path(stage_dir) / LENGTH_TARGET_FILE

    def decide() -> dict | str:
        if path.exists():
            try:
                record = json.loads(path.read_text())
                target, source = int(record["target"]), record["source"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                return f"{path}: unreadable length target ({err}); remove the file to measure it again"
            found = (source, target if source == "given" else record.get("quantile"))
            asked = ("given", given) if given is not None else ("quantile", quantile)
            if found != asked:
                setting = f"length_target {given}" if given is not None else f"length_target_quantile {quantile}"
                return (f"{path}: this stage trains toward target {target} ({source} {found[1]}), which {setting} "
                        "would not set; use a new run folder or remove the file")
            print(f"rlvr: length target {target} tokens, reused from {path}")
            return record
        if given is not None:
            record = {"target": int(given), "source": "given", "quantile": None, "lengths": 0}
            how = "given (length_target)"
        else:
            eos = end_token_ids(tokenizer, model)
            generations = measure_lengths(model, tokenizer, examples, config, thinking=thinking, seed=seed)
            lengths = [response_length(g, eos) for g in generations]
            record = {"target": max(quantile_length(lengths, quantile), 1), "source": "quantile",
                      "quantile": quantile, "lengths": len(lengths), "mean_length": sum(lengths) / len(lengths),
                      "truncation_rate": sum(g.truncated for g in generations) / len(generations),
                      "temperature": config.temperature, "max_completion_length": config.max_completion_length,
                      "seed": seed}
            how = (f"the {quantile} quantile of the starting checkpoint's lengths on {len(lengths)} "
                   "training problems")
        record["reward"] = reward
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"rlvr: length target {record['target']} tokens, {how}")
        return record

    decided = main_decides(decide)
    if isinstance(decided, str):
        raise ValueError(decided)
    return int(decided["target"])


# ---------------------------------------------------------------- dynamic sampling


def informative_groups(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool per group: True when some advantage in the group is non-zero (rewards not all equal)."""
    return (advantages.view(-1, group_size) != 0).any(dim=1)


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The rows `rows` (a LongTensor of indices) of every per-row entry of a generation batch."""
    size = batch["advantages"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == size:
            out[key] = value[rows]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def concat_batches(batches: list[dict], pad_token_id: int) -> dict:
    """Concatenate generation batches row-wise, padding prompts on the left and the rest on the right."""
    out = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if isinstance(first, torch.Tensor) and first.ndim >= 2:
            width = max(v.shape[1] for v in values)
            fill = pad_token_id if key.endswith("_ids") else 0
            padded = []
            for v in values:
                extra = v.new_full((v.shape[0], width - v.shape[1], *v.shape[2:]), fill)
                padded.append(torch.cat([extra, v] if key in LEFT_PADDED else [v, extra], dim=1))
            out[key] = torch.cat(padded, dim=0)
        elif isinstance(first, torch.Tensor) and first.ndim == 1:
            out[key] = torch.cat(values, dim=0)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = first
    return out


class RefillSampler:
    """Fresh prompts for refilled groups, drawn from the train set in a seeded shuffled order.

    Each process draws from its own seeded order (so processes refill with different prompts), and a
    refill round asks every process for the same number of groups: TRL's generation gathers rewards
    across processes and assumes equal shares.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.order: list[int] = []
        self.reshuffles = 0

    def draw(self, groups: int, group_size: int, process_index: int = 0) -> list[dict]:
        rows = []
        for _ in range(groups):
            if not self.order:
                generator = torch.Generator().manual_seed(self.seed + 1000 * self.reshuffles + process_index)
                self.order = torch.randperm(len(self.dataset), generator=generator).tolist()
                self.reshuffles += 1
            example = self.dataset[self.order.pop()]
            rows.extend(dict(example) for _ in range(group_size))
        return rows


def global_max(accelerator, value: int) -> int:
    """The largest `value` over all processes (the value itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="max").item())


def global_sum(accelerator, value: float) -> float:
    """The sum of `value` over all processes."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), reduction="sum").item()


class RolloutTokens:
    """Base of the GRPO-family trainers (RLVR, OPSD), before GRPOTrainer: the running total of rollout
    tokens (`rollout_budget`), counted at every generation round over all processes, kept in every
    checkpoint and restored on resume, and the `RolloutBudget` that ends training once it reaches
    `max_rollout_tokens` (None: no budget), added before any other stage callback."""

    def __init__(self, *args, max_rollout_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_tokens = 0
        self.max_rollout_tokens = max_rollout_tokens
        self.add_callback(RolloutBudget(self, max_rollout_tokens))

    def _generate(self, prompts):
        generated = super()._generate(prompts)
        if self.model.training:  # (TRL's own test for a training round)
            # (prompt_ids, completion_ids, tool_mask, ...): the tokens the model generated, as TRL counts them
            completion_ids, tool_mask = generated[1], generated[2]
            local = sum(map(sum, tool_mask)) if tool_mask is not None else sum(map(len, completion_ids))
            self.rollout_tokens += int(global_sum(self.accelerator, local))
        return generated

    def _save_checkpoint(self, model, trial):
        # Before the Trainer's own files: it writes trainer_state.json last, and a folder without it is
        # discarded on resume (runtime.resume_point), so the count is in every checkpoint resumed from.
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            save_checkpoint_tokens(folder, self.rollout_tokens)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:  # (a checkpoint written before the count was kept has none: counted from here)
            self.rollout_tokens = checkpoint_tokens(checkpoint) or 0


class LeftAlignedScoring:
    """Base of the GRPO-family trainers, before GRPOTrainer: TRL's scoring forwards (the policy's, old and
    reference log-probabilities) over a padded batch run without a tokens x tokens attention mask
    (`padding.left_aligned`), so that their memory grows linearly with the completion length."""

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with left_aligned(model):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)


class RLVRTrainer(RolloutTokens, LeftAlignedScoring, GRPOTrainer):
    """GRPOTrainer plus optional dynamic sampling (drop all-equal-reward groups, refill the batch)."""

    def __init__(self, *args, dynamic_sampling: bool = False, dynamic_sampling_max_rounds: int = 4, **kwargs):
        keep_cpu_weights_syncable(kwargs.get("args"))
        super().__init__(*args, **kwargs)
        self.dynamic_sampling = dynamic_sampling
        self.dynamic_sampling_max_rounds = dynamic_sampling_max_rounds
        self.refill = RefillSampler(self.train_dataset, self.args.seed)

    def _generate_and_score_completions(self, inputs):
        if not (self.dynamic_sampling and self.model.training):
            return super()._generate_and_score_completions(inputs)
        group = self.num_generations
        needed = len(inputs) // group
        kept, spare, dropped = [], [], 0
        batch_inputs = inputs
        for round_index in range(self.dynamic_sampling_max_rounds):
            batch = super()._generate_and_score_completions(batch_inputs)
            informative = informative_groups(batch["advantages"], group)
            dropped += int((~informative).sum())
            for g, useful in enumerate(informative.tolist()):
                rows = torch.arange(g * group, (g + 1) * group, device=batch["advantages"].device)
                (kept if useful else spare).append(select_rows(batch, rows))
            # Every process runs the same rounds with the same number of groups (generation is collective).
            missing = global_max(self.accelerator, max(needed - len(kept), 0))
            if missing == 0:
                break
            batch_inputs = self.refill.draw(missing, group, self.accelerator.process_index)
        groups = (kept + spare)[:needed]  # short of informative groups: fill with uninformative ones
        merged = concat_batches(groups, self.processing_class.pad_token_id)
        mask = merged.get("tool_mask", 1) * merged["completion_mask"]
        merged["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        self._metrics["train"]["dynamic_sampling/rounds"].append(round_index + 1)
        self._metrics["train"]["dynamic_sampling/dropped_groups"].append(dropped)
        self._metrics["train"]["dynamic_sampling/kept_fraction"].append(min(len(kept), needed) / needed)
        return merged


def run_rlvr(model, tokenizer, examples, verifier: VerifierConfig, config: RLVRStageConfig, stage_dir: Path,
             *, thinking: bool, seed: int = 0, check_examples: list[Example] | None = None,
             length_reward: str | None = None, length_target: int | None = None,
             length_target_quantile: float = 0.5, label: str = "rlvr") -> Path:
    """Train with GRPO on `examples`, resume from a checkpoint if one exists, save to stage_dir/model.

    Logged numbers go to stage_dir/metrics.jsonl; the terminal shows a bar labelled `label` (`rlvr`, or
    the pipeline's `opsd <arm> s<seed>` for a `length_rl` arm) with loss, mean reward and mean
    completion length. With `config.check_every > 0`, `check_examples` (held-out
    problems) are graded during training, a stopping rule may end it, and model/ holds the checkpoint
    the selection rule picks (`checks`).

    Length-aware RL (`length_reward`, a name in `rewards.LENGTH_REWARDS`; the `length_rl` method,
    after DLER, arXiv 2510.15110): the correctness reward is replaced by one that also needs the
    response within a target length ("truncation": 1 if correct and length <= target, else 0); the
    format reward stays as configured. DLER pairs it with batch-wise reward normalisation, the
    higher clip and dynamic sampling, which are this config's `scale_rewards`, `epsilon_high` and
    `dynamic_sampling`. The target is `length_target` tokens, or else the `length_target_quantile`
    quantile of the starting checkpoint's response lengths on training problems, measured before
    training and kept in stage_dir/length_target.json for resumed runs (`decide_length_target`).
    """
    stage_dir = Path(stage_dir)
    funcs = reward_functions(verifier, tokenizer, config, model)
    if length_reward is not None:
        if length_reward not in LENGTH_REWARDS:
            raise ValueError(f"rlvr: length_reward must be one of {sorted(LENGTH_REWARDS)}, got {length_reward!r}")
        target = decide_length_target(
            model, tokenizer, examples, config, stage_dir, reward=length_reward, given=length_target,
            quantile=length_target_quantile, thinking=thinking, seed=seed)
        funcs[0] = LengthAwareReward(verifier, funcs[0].eos_token_ids, length_reward, target)
    with colocated_engine_released() as track:
        trainer = track(RLVRTrainer(
            model=model,
            reward_funcs=funcs,
            args=grpo_args(config, stage_dir, seed),
            train_dataset=rl_dataset(examples, tokenizer, thinking),
            processing_class=tokenizer,
            callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl")],
            dynamic_sampling=config.dynamic_sampling,
            dynamic_sampling_max_rounds=config.dynamic_sampling_max_rounds,
            max_rollout_tokens=config.max_rollout_tokens,
        ))
        warn_if_updates_vanish(trainer, "rlvr")
        check = attach_checks(trainer, config, stage_dir, check_examples, verifier, thinking=thinking, stage="rlvr",
                              label=label)
        train_checked(trainer, check, lambda: train_stage(trainer, stage_dir, label, RLVR_POSTFIX))
        return save_trained(trainer, stage_dir / "model")
