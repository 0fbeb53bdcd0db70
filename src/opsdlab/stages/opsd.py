"""OPSD stage: on-policy self-distillation toward a privileged self-teacher, gated by rollout outcome.

Objective: for each kept response token t, D(p_S(.|x, y<t) || p_T(.|x, c, y<t)) (reverse KL by
default; see `divergences.DIVERGENCES`), plus, with `anchor_beta` > 0, anchor_beta x KL(p_S || p_0), p_0
the stage's starting model reading the student's prompt (`teacher.start_weights`); weighted per token
by position (`positions.token_weights`: only the first `supervised_tokens`, and `position_weighting`)
and averaged over the weighted tokens, sum(w x loss) / sum(w); gradient through the student only. The student samples y from the problem x alone; the teacher is the same network
(`teacher.TEACHER_WEIGHTS`) reading the privileged context c (`prompts.TEACHER_CONTEXTS`); both
score the same response token ids. Rollouts are graded by the one verifier and gated
(`gates.GATES`) before any forward pass.

Generation, reward bookkeeping, accelerate, PEFT, vLLM and logging are TRL's GRPOTrainer; this
subclass replaces the policy-gradient loss by the distillation loss. The loss is the weighted mean over
every kept token of an optimizer step, whatever the split into micro-batches and processes
(`loss_normalizer`): the token weights, and the margins `margin_cut` reads, are decided when the step's
rollouts are made, so the step's summed weight is known before its first micro-batch. A step whose gate keeps too little is refilled with fresh prompts; one that
keeps nothing anywhere skips its optimizer step. One rollout per prompt (the paper's setting) runs on
TRL's trainer with groups of one (`rlvr.grpo_args`): prompts are not repeated, and the advantages
that TRL computes from groups are unused here.

Why one file of ~800 lines: the trainer subclass overrides TRL's generation-and-score and loss hooks,
and the pieces (gating and refill, teacher prompts and their siblings, the packed scoring of both
sides, the loss normaliser) share the trainer's state; split apart they would pass that state around.
The pure parts already live in `loss/` (divergences, gates, contrastive targets, position weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType, is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import pad
from transformers import TrainerCallback

from opsdlab.config.divergence import DivergenceOptions
from opsdlab.config.stages import OPSDStageConfig
from opsdlab.stages.checks import attach_checks, train_checked
from opsdlab.loss.contrastive import VARIANTS, pack
from opsdlab.tasks.data import DEFAULT_INSTRUCTION, Example, pair_unrelated
from opsdlab.loss.chunked import Anchor, chunked_divergence, sampled_log_probs
from opsdlab.loss.positions import POSITION_WEIGHTINGS, supervised, token_weights
from opsdlab.loss.targets import SupportTarget
from opsdlab.loss.gates import route
from opsdlab.modeling.models import end_token_ids, final_hidden, head_dtype, output_head, save_policy
from opsdlab.modeling.padding import left_aligned
from opsdlab.modeling.parts import head_module
from opsdlab.stages.progress import OPSD_POSTFIX, train_stage
from opsdlab.tasks.prompts import render_prompt
from opsdlab.loss.rewards import VerifierReward
from opsdlab.stages.rlvr import (LeftAlignedScoring, RefillSampler, RolloutTokens, concat_batches, global_sum, grpo_args,
                                 rl_dataset, select_rows)
from opsdlab.modeling.runtime import JsonlMetrics, is_main_process, save_trained, warn_if_updates_vanish, write_updates
from opsdlab.stages.teacher import (build_teacher, is_zero3, load_teacher_state, save_teacher_state, start_weights,
                                    student_adapter_saved_alone)
from opsdlab.tasks.verifier import VerifierConfig
from opsdlab.evaluation.vllm_backend import colocated_engine_released, keep_cpu_weights_syncable


def divergence_options(config: OPSDStageConfig) -> DivergenceOptions:
    """The divergence knobs of an OPSD stage config."""
    return DivergenceOptions(beta=config.jsd_beta, clip_tau=config.clip_tau, top_k=config.top_k)


def peft_config(config: OPSDStageConfig):
    """A PEFT LoraConfig when `config.lora_r` > 0, else None (full fine-tuning)."""
    if config.lora_r == 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.lora_target_modules,
                      task_type="CAUSAL_LM")


def opsd_args(config: OPSDStageConfig, stage_dir: Path, seed: int, *, num_processes: int | None = None):
    """TRL's GRPOConfig for an OPSD stage: `prompts_per_step` x `rollouts_per_prompt` rollouts per
    optimizer step over all processes and accumulation steps (see `rlvr.grpo_args`).

    vLLM's importance-sampling correction is off: TRL would score every generation batch once more
    with the student (a no-grad forward over all rollouts) to reweight its policy-gradient loss, which
    the distillation loss replaces. With one generation batch per optimizer step (steps_per_generation
    = gradient_accumulation_steps, num_iterations 1) TRL computes no old log-probabilities otherwise.
    """
    return grpo_args(config.as_rlvr(), stage_dir, seed, rollouts_per_prompt=config.rollouts_per_prompt,
                     num_processes=num_processes, stage="opsd", vllm_importance_sampling_correction=False)


def response_positions(prompt_width: int, completion_width: int) -> slice:
    """Positions whose next-token distribution scores completion tokens 0..C-1.

    Inputs are [left-padded prompt | right-padded completion]; the hidden state at position i
    predicts token i+1, so completion token j (at prompt_width + j) is scored at prompt_width + j - 1.
    """
    return slice(prompt_width - 1, prompt_width - 1 + completion_width)


def check_alignment(student_ids, student_attn, student_positions: slice, teacher_ids, teacher_attn,
                    teacher_positions: slice, response_ids, response_mask) -> None:
    """Raise unless student and teacher score exactly the response tokens, from real (unpadded) positions.

    Each side is checked on the sequence actually fed to its forward pass: the token that follows
    each scoring position must be the response token it is scored against, and the scoring
    position itself must be attended. An off-by-one in either side's positions, a prompt padded on
    the wrong side or a response misplaced in either sequence makes this fail.
    """
    mask = response_mask.bool()
    aligned = []
    for role, ids, attn, positions in (("student", student_ids, student_attn, student_positions),
                                       ("teacher", teacher_ids, teacher_attn, teacher_positions)):
        width = positions.stop - positions.start
        targets = ids[:, positions.start + 1:positions.stop + 1]
        attended = attn[:, positions.start:positions.stop]
        if width != response_ids.shape[1] or targets.shape != response_ids.shape:
            raise RuntimeError(f"OPSD alignment: the {role} scores {targets.shape[1]} positions for a "
                               f"{response_ids.shape[1]}-token response; check prompt padding and the chat template")
        aligned.append(((targets == response_ids) & attended.bool() | ~mask).all())
    # One read back from the device for both sides.
    for role, ok in zip(("student", "teacher"), torch.stack(aligned).tolist()):
        if not ok:
            raise RuntimeError(f"OPSD alignment: the {role}'s scored positions do not predict the response tokens; "
                               "check prompt padding and the chat template")


@dataclass(frozen=True)
class Side:
    """One forward pass's input: a prompt followed by the response, and the positions that score the response."""

    ids: torch.Tensor
    attn: torch.Tensor
    positions: slice


# The batch key of each role's left-padded prompt ids (`<key>_ids`) and mask (`<key>_mask`).
_PROMPT_KEYS = {"student": "prompt", "teacher": "teacher_prompt", "contrast": "contrast_prompt"}


def aligned_sequences(inputs: dict, rows: torch.Tensor, width: int,
                      roles: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Side]]:
    """The response ids and mask of `rows` (tool tokens masked out), cut to their first `width` columns, and
    each role's `Side` reading them, every other role checked against the student (`check_alignment`)."""
    response_ids = inputs["completion_ids"][rows, :width]
    response_attn = inputs["completion_mask"][rows, :width]
    response_mask = response_attn * inputs["tool_mask"][rows, :width] if "tool_mask" in inputs else response_attn
    sides = {}
    for role in roles:
        prompt_ids, prompt_mask = (inputs[f"{_PROMPT_KEYS[role]}_{part}"][rows] for part in ("ids", "mask"))
        sides[role] = Side(torch.cat([prompt_ids, response_ids], dim=1), torch.cat([prompt_mask, response_attn], dim=1),
                           response_positions(prompt_ids.shape[1], width))
    student = sides["student"]
    for role in roles:
        if role != "student":
            other = sides[role]
            check_alignment(student.ids, student.attn, student.positions, other.ids, other.attn, other.positions,
                            response_ids, response_mask)
    return response_ids, response_mask, sides


def response_hidden(model, input_ids, attention_mask, positions: slice) -> torch.Tensor:
    """Final hidden states at the scored positions; the LM head runs later, one chunk at a time."""
    return final_hidden(model, input_ids, attention_mask)[:, positions]


def response_logits(model, input_ids, attention_mask, positions: slice) -> torch.Tensor:
    """Logits at the scored positions, computed inside the model's own forward (`logits_to_keep`), with no
    tokens x tokens attention mask (`padding.left_aligned`)."""
    keep = input_ids.shape[1] - positions.start
    with left_aligned(model):
        output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    return output.logits[:, :positions.stop - positions.start]


@dataclass(frozen=True)
class ScoredTokens:
    """The response tokens one micro-batch scores: a [rows, width] mask (the columns after `width` hold none),
    their row-major flat index, each row's count and their summed loss weight."""

    mask: torch.Tensor
    flat: torch.Tensor
    lengths: list[int]
    weight_sum: float


def kept_tokens(weights: torch.Tensor, response: torch.Tensor) -> ScoredTokens:
    """The tokens of weight > 0 (`positions.token_weights`); where none has weight, every response token,
    with weight 0: every process must run the same forward/backward collectives (DDP's gradient
    all-reduce) even when its micro-batch carries no loss. One read-back from the device, no boolean-mask
    indexing: the values of the loss that depend on the data, not on shapes (a memory trace with fake
    tensors supplies them)."""
    carried = weights > 0
    scored = torch.where(carried.any(), carried, response.bool())
    columns = torch.arange(1, scored.shape[1] + 1, device=scored.device)
    *lengths, width, weight_sum = torch.cat([scored.sum(dim=1), (scored.any(dim=0) * columns).max().view(1),
                                             weights.sum().view(1)]).float().tolist()
    mask = scored[:, :max(int(width), 1)]  # later columns carry no loss: the forwards stop there (causal attention)
    return ScoredTokens(mask, mask.reshape(-1).nonzero().squeeze(1), [int(n) for n in lengths], weight_sum)


def _identity_head(model, compute_dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: logits


@dataclass(frozen=True)
class Scoring:
    """How student and teacher score the response: `scores(model, ids, attn, positions)` runs the
    model, `head(unwrapped_model, compute_dtype)` maps those scores to logits inside `chunked_divergence`
    (`compute_dtype`: the launch's mixed-precision dtype or None, `models.output_head`)."""

    scores: Callable
    head: Callable
    head_params: Callable  # unwrapped model -> the trainable tensors `head` reads, or None (`chunked_divergence`)


def _head_params(model) -> list[torch.nn.Parameter]:
    head = head_module(model)
    return [] if head is None else [p for p in head.parameters() if p.requires_grad]


# "hidden": the LM head applied to hidden states chunk by chunk, so no [tokens, V] tensor exists
# (peak O(chunk x V)), its gradient taken in the forward (three head products per chunk, not five).
# "logits": the model's forward computes the logits ([tokens, V] twice, student and teacher), for
# models whose LM head weights are whole only inside their forward; its chunks are recomputed in the
# backward (an identity head: no product to repeat) instead of holding a [tokens, V] gradient.
SCORINGS = {
    "hidden": Scoring(response_hidden, output_head, _head_params),
    "logits": Scoring(response_logits, _identity_head, lambda model: None),
}


def scoring_for(accelerator) -> str:
    """The `SCORINGS` entry for this launch.

    FSDP (reshard after forward) and DeepSpeed ZeRO-3 keep each parameter sharded outside the forward
    of the module that owns it, so an LM head applied to hidden states after the forward sees a shard
    (FSDP2: "mixed torch.Tensor and DTensor"); there the logits come from the forward itself.
    """
    sharded = accelerator.distributed_type == DistributedType.FSDP or is_zero3(accelerator)
    return "logits" if sharded else "hidden"


def loss_normalizer(step_tokens: float, num_processes: int, accumulation_steps: int,
                    steps_per_generation: int) -> float:
    """What one micro-batch divides its summed (weighted) per-token loss by.

    The processes' gradients are averaged and the micro-batches of an optimizer step are summed,
    so dividing each process's sum by step_tokens / num_processes gives the mean over every kept
    token of the optimizer step, however the step is split. `step_tokens` is the summed token weight
    (`positions.token_weights`) of a whole generation batch over all processes: its kept, supervised
    tokens when every weight is 1, so that the loss is sum(w x loss) / sum(w) over the step; when a generation batch feeds several optimizer
    steps it is rescaled to one step, as TRL does for its token-level losses.
    """
    normalizer = max(step_tokens, 1.0) / num_processes
    if steps_per_generation != accumulation_steps:
        normalizer *= accumulation_steps / steps_per_generation
    return normalizer


# In every checkpoint: the optimizer steps skipped so far, so that a resumed stage counts them all.
SKIPPED_STEPS_FILE = "opsd_skipped_steps.json"


class _TeacherUpdate(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if not self.trainer.last_step_skipped:
            self.trainer.teacher.after_step(self.trainer.accelerator.unwrap_model(self.trainer.model))


class _SkipAwareScheduler:
    """A learning-rate scheduler whose `step` does nothing after an optimizer step the trainer skipped.

    Whoever advances the schedule at the end of an optimizer step (the Trainer's loop, accelerate's
    wrapper, DeepSpeed's engine) calls `step` after the optimizer's, which decides `last_step_skipped`.
    Everything else (state_dict, get_last_lr, last_epoch ...) is the wrapped scheduler's.
    """

    def __init__(self, scheduler, trainer):
        self.scheduler = scheduler
        self.trainer = trainer

    def step(self, *args, **kwargs):
        if self.trainer.last_step_skipped:
            return None
        return self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("scheduler", "trainer"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class OPSDTrainer(RolloutTokens, LeftAlignedScoring, GRPOTrainer):
    """GRPOTrainer whose loss is outcome-gated self-distillation toward a privileged teacher (its rollout
    tokens counted and budgeted by `RolloutTokens`)."""

    def __init__(self, *args, opsd: OPSDStageConfig, student_thinking: bool, token_stats_path: Path | None = None,
                 **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        pretrained_adapter = isinstance(model, torch.nn.Module) and is_peft_model(model)
        keep_cpu_weights_syncable(kwargs.get("args"))
        super().__init__(*args, max_rollout_tokens=opsd.max_rollout_tokens, **kwargs)
        self.opsd = opsd
        self.teacher_thinking = student_thinking if opsd.teacher_thinking is None else opsd.teacher_thinking
        self.teacher = build_teacher(opsd.teacher_weights, self.accelerator.unwrap_model(self.model),
                                     self.accelerator, rate=opsd.ema_rate, refresh_steps=opsd.teacher_refresh_steps,
                                     pretrained_adapter=pretrained_adapter)
        # The stage's starting weights, which the loss's anchor term reads (`start_weights`): None without one.
        self.anchor = (start_weights(self.teacher, self.accelerator.unwrap_model(self.model), self.accelerator,
                                     pretrained_adapter=pretrained_adapter) if opsd.anchor_beta > 0 else None)
        self.divergence_options = divergence_options(opsd)
        self.scoring = SCORINGS[scoring_for(self.accelerator)]
        self.head_dtype = head_dtype(self.accelerator)  # bf16 operands, float32 logits under bf16 mixed precision
        self.token_stats_path = token_stats_path
        self.refill = RefillSampler(self.train_dataset, self.args.seed)
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._step_kept_tokens = 0
        self._step_undecided = True  # until this optimizer step's first call decides (last_step_skipped)
        self.add_callback(_TeacherUpdate(self))

    # -------------------------------------------------------------- rollouts -> gated batch
    def _gated_round(self, inputs: list[dict]) -> dict:
        """Generate and grade one round of rollouts, route them through the gate, add teacher prompts."""
        batch = super()._generate_and_score_completions(inputs)
        grader = next(f for f in self.reward_funcs if isinstance(f, VerifierReward))
        correct, truncated = list(grader.last_correct), list(grader.last_truncated)
        routes = route(self.opsd.gate, correct, truncated, self.opsd.divergence)
        texts = [self.processing_class.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
        teacher_prompts = [
            render_prompt(self.processing_class, _example(row), thinking=self.teacher_thinking,
                          context=self.opsd.teacher_context, sibling=_correct_sibling(i, correct, truncated, texts,
                                                                                      self.num_generations))
            for i, row in enumerate(inputs)
        ]
        device = batch["prompt_ids"].device
        if self.opsd.method == "contrastive":  # the same teacher reads the negative prompt too
            negatives = CONTRAST_NEGATIVES[VARIANTS[self.opsd.contrast_variant].negative](
                self, inputs, correct, truncated, texts)
            unpaired = [i for i, (r, prompt) in enumerate(zip(routes, negatives)) if r is not None and prompt is None]
            for i in unpaired:  # no contrast pair: the rollout carries no loss
                routes[i] = None
            self._metrics["train" if self.model.training else "eval"]["opsd/contrast_unpaired"].append(
                len(unpaired) / len(inputs))
            # A row without a pair is never scored; its own teacher prompt fills its place.
            contrast = [teacher_prompts[i] if prompt is None else prompt for i, prompt in enumerate(negatives)]
            batch["contrast_prompt_ids"], batch["contrast_prompt_mask"] = self._prompt_tensors(contrast, device)
        teacher_ids, teacher_mask = self._prompt_tensors(teacher_prompts, device)
        batch.update(teacher_prompt_ids=teacher_ids, teacher_prompt_mask=teacher_mask, route=routes,
                     correct=torch.tensor(correct, device=device), truncated=torch.tensor(truncated, device=device))
        return batch

    def _prompt_tensors(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask of rendered prompts, tokenized by the same call (and
        special-token policy) TRL applies to the student prompts."""
        rows = [torch.tensor(ids) for ids in self._tokenize_prompts(prompts)[0]]
        ids = pad(rows, padding_value=self.processing_class.pad_token_id, padding_side="left").to(device)
        mask = pad([torch.ones_like(t) for t in rows], padding_value=0, padding_side="left").to(device)
        return ids, mask

    def _generate_and_score_completions(self, inputs):
        """A gated generation batch; refilled with fresh prompts while it keeps too few rollouts.

        The refill rounds are decided on counts over all processes, so every process generates the
        same rounds. Kept rollouts of every round come first; gated-out ones fill the batch up to
        its size (they are dropped again in the loss).
        """
        mode = "train" if self.model.training else "eval"
        size = len(inputs)
        rounds = [self._gated_round(inputs)]
        while mode == "train" and len(rounds) < self.opsd.refill_max_rounds:
            kept = sum(r is not None for batch in rounds for r in batch["route"])
            if global_sum(self.accelerator, min(kept, size)) >= self.opsd.min_kept_rollouts:
                break
            rounds.append(self._gated_round(self.refill.draw(size // self.num_generations, self.num_generations,
                                                             self.accelerator.process_index)))
        merged = rounds[0] if len(rounds) == 1 else self._kept_first(rounds, size)
        kept_rows = [i for i, r in enumerate(merged["route"]) if r is not None]
        merged["opsd_token_weights"] = weights = self._token_weights(merged, kept_rows, mode)
        merged["opsd_step_tokens"] = torch.tensor(global_sum(self.accelerator, float(weights.sum())),
                                                  device=merged["prompt_ids"].device)
        metrics = self._metrics[mode]
        metrics["opsd/kept_fraction"].append(len(kept_rows) / size)
        metrics["opsd/refill_rounds"].append(len(rounds) - 1)
        return merged

    def _token_weights(self, batch: dict, kept_rows: list[int], mode: str) -> torch.Tensor:
        """Each response token's loss weight (`positions.token_weights`; 0 on gated-out rollouts), decided here,
        before the step's loss, so that the step's summed weight normalises it over every micro-batch and
        process (`loss_normalizer`). The margins that `margin_cut` reads are scored now (`_margins`), with
        the weights the loss will read: one generation batch feeds one optimizer step."""
        response = batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]
        kept = torch.zeros(response.shape[0], device=response.device)
        kept[kept_rows] = 1.0
        response = response.float() * kept[:, None]
        in_scope = supervised(response, self.opsd.supervised_tokens)
        reads_margin = POSITION_WEIGHTINGS[self.opsd.position_weighting].reads_margin
        margin = self._margins(batch, in_scope) if reads_margin else None
        weights = token_weights(response, self.opsd, margin)
        if self.opsd.supervised_tokens is not None or self.opsd.position_weighting != "none":
            totals = torch.stack([response.sum(), (weights > 0).sum(), in_scope.sum(), weights.sum(),
                                  (margin * in_scope).sum() if margin is not None else weights.new_zeros(())]).tolist()
            metrics = self._metrics[mode]
            if totals[0]:  # (a round that kept nothing has no tokens to describe)
                # the share of the kept rollouts' response tokens that carry a loss, and the mean weight of
                # the supervised tokens (those within supervised_tokens)
                metrics["opsd/supervised_fraction"].append(totals[1] / totals[0])
                metrics["opsd/mean_weight"].append(totals[3] / totals[2])
                if margin is not None:
                    metrics["opsd/margin"].append(totals[4] / totals[2])
        return weights

    @torch.no_grad()
    def _margins(self, batch: dict, scope: torch.Tensor) -> torch.Tensor:
        """The teacher-minus-student log-probability of each sampled token within `scope` (a [B, C] mask; 0
        elsewhere), scored a micro-batch of rows at a time.

        Every process runs the same number of forward passes (sharded launches gather weights in each):
        a process with fewer rows to score scores a placeholder row and discards it.
        """
        margin = torch.zeros(scope.shape, device=scope.device)
        width = scope.shape[1] if self.opsd.supervised_tokens is None else min(scope.shape[1],
                                                                                self.opsd.supervised_tokens)
        rows = [i for i, any_token in enumerate(scope.any(dim=1).tolist()) if any_token]
        step = self.args.per_device_train_batch_size
        parts = [rows[i:i + step] for i in range(0, len(rows), step)]
        count = len(parts)
        if self.accelerator.num_processes > 1:
            count = int(self.accelerator.gather(torch.tensor([count], device=scope.device)).max())
        unwrapped = self.accelerator.unwrap_model(self.model)
        for k in range(count):
            part = parts[k] if k < len(parts) else [0]
            index = torch.tensor(part, device=scope.device)
            response_ids, _, sides = aligned_sequences(batch, index, width, ("student", "teacher"))
            student, teacher = sides["student"], sides["teacher"]
            student_scores = self.scoring.scores(self.model, student.ids, student.attn, student.positions)
            with self.teacher.use(unwrapped) as teacher_model:
                teacher_scores = self.scoring.scores(teacher_model, teacher.ids, teacher.attn, teacher.positions)
                teacher_head = self.scoring.head(self.accelerator.unwrap_model(teacher_model), self.head_dtype)
            if k >= len(parts):
                continue
            flat = scope[index, :width].reshape(-1).nonzero().squeeze(1)
            ids = response_ids.reshape(-1).index_select(0, flat)

            def log_probs(scores, head):
                hidden = scores.reshape(-1, scores.shape[-1]).index_select(0, flat)
                return sampled_log_probs(hidden, head, ids, self.opsd.chunk_size, self.temperature)

            block = torch.zeros(len(part) * width, device=scope.device)
            block[flat] = (log_probs(teacher_scores, teacher_head)
                           - log_probs(student_scores, self.scoring.head(unwrapped, self.head_dtype)))
            margin[index, :width] = block.view(len(part), width)
        return margin

    def _kept_first(self, rounds: list[dict], size: int) -> dict:
        """`size` rows of several gated rounds: every kept rollout first, then gated-out ones."""
        parts = []
        for keep in (True, False):
            for batch in rounds:
                rows = [i for i, r in enumerate(batch["route"]) if (r is not None) == keep]
                if rows:
                    parts.append(select_rows(batch, torch.tensor(rows, device=batch["prompt_ids"].device)))
        merged = concat_batches(parts, self.processing_class.pad_token_id)
        return select_rows(merged, torch.arange(size, device=merged["prompt_ids"].device))

    # -------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        keep = [i for i, r in enumerate(inputs["route"]) if r is not None]
        rows_list = keep or [0]
        rows = torch.tensor(rows_list, device=inputs["prompt_ids"].device)
        weights = inputs["opsd_token_weights"][rows]  # 0 on gated-out rows, padding and unsupervised tokens
        scored = kept_tokens(weights, inputs["completion_mask"][rows])
        mask, flat, lengths, weight_sum = scored.mask, scored.flat, scored.lengths, scored.weight_sum
        width = mask.shape[1]
        contrast = "contrast_prompt_ids" in inputs
        response_ids, _, sides = aligned_sequences(inputs, rows, width,
                                                   ("student", "teacher", "contrast") if contrast else ("student", "teacher"))
        student, teacher = sides["student"], sides["teacher"]

        student_scores = self.scoring.scores(model, student.ids, student.attn, student.positions)
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), self.teacher.use(unwrapped) as teacher_model:
            teacher_scores = self.scoring.scores(teacher_model, teacher.ids, teacher.attn, teacher.positions)
            if contrast:
                contrast_scores = self.scoring.scores(teacher_model, sides["contrast"].ids, sides["contrast"].attn,
                                                      sides["contrast"].positions)
            teacher_head = self.scoring.head(self.accelerator.unwrap_model(teacher_model), self.head_dtype)
        if self.anchor is not None:  # the starting model reads the student's own (checked) sequence
            with torch.no_grad(), self.anchor.use(unwrapped) as start_model:
                anchor_scores = self.scoring.scores(start_model, student.ids, student.attn, student.positions)
                anchor_head = self.scoring.head(self.accelerator.unwrap_model(start_model), self.head_dtype)
        names = [inputs["route"][i] or self.opsd.divergence for i in rows_list]
        token_names = [names[r] for r, n in enumerate(lengths) for _ in range(n)]

        def kept(scores):
            return scores.reshape(-1, scores.shape[-1]).index_select(0, flat)

        student_head = self.scoring.head(unwrapped, self.head_dtype)
        teacher_kept = kept(teacher_scores).detach()
        if contrast:  # the "teacher" is the contrastive target: [student | teacher | negative teacher] -> target
            teacher_kept = pack(kept(student_scores), teacher_kept, kept(contrast_scores))
            teacher_head = self._contrast_head(student_head, teacher_head, student_scores.shape[-1])
        token_weights_n = weights[:, :width].reshape(-1).index_select(0, flat)
        anchor = None if self.anchor is None else Anchor(kept(anchor_scores), anchor_head, self.opsd.anchor_beta)
        loss_sum, stats = chunked_divergence(
            kept(student_scores), teacher_kept, student_head, teacher_head, response_ids.reshape(-1).index_select(0, flat), token_names, self.divergence_options,
            chunk_size=self.opsd.chunk_size, temperature=self.temperature, head_params=self.scoring.head_params(unwrapped),
            token_weight_N=token_weights_n, anchor=anchor,
        )
        tokens = sum(lengths) if weight_sum > 0 else 0  # tokens that carry a loss
        if mode == "train":
            # `opsd_step_tokens`: the step's summed token weight (its supervised tokens when every weight is 1)
            normalizer = loss_normalizer(float(inputs["opsd_step_tokens"]), self.accelerator.num_processes,
                                         self.current_gradient_accumulation_steps, self.args.steps_per_generation)
            self._step_kept_tokens += tokens
            self._step_undecided = True
        else:
            normalizer = weight_sum or 1.0
        loss = loss_sum * (1.0 if tokens else 0.0) / normalizer

        metrics = self._metrics[mode]
        if tokens:
            with torch.no_grad():  # the logged numbers in one read-back
                logged = torch.stack([loss_sum.detach() / weight_sum, stats["student_entropy_N"].mean(),
                                      stats["teacher_entropy_N"].mean(),
                                      (stats["teacher_logp_N"] - stats["student_logp_N"]).mean(),
                                      stats["weight_N"].mean(), stats["anchor_kl_N"].mean()]).tolist()
            metrics["opsd/loss"].append(logged[0])
            metrics["opsd/kept_tokens"].append(float(tokens))
            metrics["opsd/student_entropy"].append(logged[1])
            metrics["opsd/teacher_entropy"].append(logged[2])
            metrics["opsd/teacher_minus_student_logp"].append(logged[3])
            if contrast:
                metrics["opsd/contrast_token_weight"].append(logged[4])
            if self.anchor is not None:
                metrics["opsd/anchor_kl"].append(logged[5])
            if mode == "train":
                self._write_token_stats(response_ids, mask, stats, names, inputs["correct"][rows], token_weights_n)
        return loss

    def _contrast_head(self, student_head, teacher_head, width: int):
        """The contrast variant's teacher head (`contrastive.VARIANTS`) at the sampling temperature T: each
        part's logits are divided by T before the contrast. A full-vocabulary target's log-probabilities
        are multiplied by T, so that the divergence's own division by T leaves the target q itself; a
        `SupportTarget` is taken as it is."""
        t = self.temperature
        head = VARIANTS[self.opsd.contrast_variant].head(lambda h: student_head(h) / t, lambda h: teacher_head(h) / t,
                                                         width, self.opsd)
        if t == 1.0:
            return head

        def tempered(packed):
            target = head(packed)
            return target if isinstance(target, SupportTarget) else target * t

        return tempered

    # -------------------------------------------------------------- optimizer step and checkpoints
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, whose step is skipped when no process kept a token this step.

        A zero gradient is not a no-op for AdamW (momentum and weight decay still move the weights),
        so an empty step must not reach the optimizer at all.
        """
        optimizer = super().create_optimizer(model)
        if getattr(optimizer, "_opsd_guarded", False):
            return optimizer
        inner_step = optimizer.step

        def step(*args, **kwargs):
            # DeepSpeed's ZeRO optimizers call this once per parameter group within one optimizer step:
            # the first call decides for the step, the next micro-batch's loss clears the decision.
            if self._step_undecided:
                self._step_undecided = False
                kept = global_sum(self.accelerator, self._step_kept_tokens)
                self._step_kept_tokens = 0
                self.last_step_skipped = kept == 0
                if self.last_step_skipped:
                    self.skipped_steps += 1
                    self._metrics["train"]["opsd/skipped_steps"].append(self.skipped_steps)
            if self.last_step_skipped:
                return None
            return inner_step(*args, **kwargs)

        optimizer.step = step
        optimizer._opsd_guarded = True
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's learning-rate schedule, which does not move on an optimizer step that was skipped
        (`create_optimizer`): a step that kept nothing is no training step."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        per_step = not isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, _SkipAwareScheduler))
        if per_step and scheduler is not None:
            self.lr_scheduler = scheduler = _SkipAwareScheduler(scheduler, self)
        return scheduler

    def _save_checkpoint(self, model, trial):
        # The teacher's state goes in first: the Trainer writes trainer_state.json last, and a folder
        # without it is discarded on resume (runtime.resume_point), so a checkpoint is all or nothing.
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            save_teacher_state(self.teacher, self.accelerator.unwrap_model(self.model), folder)
            (folder / SKIPPED_STEPS_FILE).write_text(json.dumps({"skipped_steps": self.skipped_steps}) + "\n")
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        # Every checkpoint (and checks' start folder) holds the student's adapter alone; see
        # `student_adapter_saved_alone` for why a teacher adapter beside it would not be resumed from.
        with student_adapter_saved_alone(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save(output_dir, state_dict)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_teacher_state(self.teacher, self.accelerator.unwrap_model(self.model), checkpoint)
            skipped = Path(checkpoint) / SKIPPED_STEPS_FILE
            if skipped.is_file():  # (checkpoints written before it was kept have none: counted from here)
                self.skipped_steps = json.loads(skipped.read_text())["skipped_steps"]

    def _write_token_stats(self, completion_ids, mask, stats, names, correct, weights) -> None:
        """Per-token numbers of a few rollouts: the report ranks tokens and draws KL by position.

        The tokens are those scored (the supervised ones of weight > 0); `loss` is each one's divergence to
        the teacher, unweighted. With a position weighting each row also has each token's `weight`, with an
        anchor each token's `anchor_kl`."""
        if self.token_stats_path is None or not self.accelerator.is_main_process or self.opsd.token_stats_rows == 0:
            return
        lengths = mask.sum(dim=1).tolist()
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + int(n))
        with open(self.token_stats_path, "a") as handle:
            for r in range(min(len(lengths), self.opsd.token_stats_rows)):
                a, b = offsets[r], offsets[r + 1]
                handle.write(json.dumps({
                    "step": self.state.global_step,
                    "divergence": names[r],
                    "correct": bool(correct[r]),
                    "token_ids": completion_ids[r][mask[r]].tolist(),
                    "loss": [round(x, 5) for x in stats["loss_N"][a:b].tolist()],
                    "logp_shift": [round(x, 5) for x in (stats["teacher_logp_N"][a:b] - stats["student_logp_N"][a:b]).tolist()],
                    **({"weight": [round(x, 5) for x in weights[a:b].tolist()]}
                       if self.opsd.position_weighting != "none" else {}),
                    **({"anchor_kl": [round(x, 5) for x in stats["anchor_kl_N"][a:b].tolist()]}
                       if self.anchor is not None else {}),
                }) + "\n")


def _example(row: dict) -> Example:
    return Example(id=str(row.get("id", "")), problem=row["problem"], solution=row.get("solution", ""),
                   answer=str(row["answer"]), unrelated_solution=row.get("unrelated_solution"),
                   instruction=row.get("instruction", DEFAULT_INSTRUCTION))


def opsd_dataset(examples, tokenizer, thinking: bool):
    """RLVR's prompt rows plus, per row, another problem's solution for the `unrelated` teacher."""
    examples = pair_unrelated(examples)
    return rl_dataset(examples, tokenizer, thinking).add_column(
        "unrelated_solution", [e.unrelated_solution for e in examples])


def _correct_sibling(index: int, correct: list[bool], truncated: list[bool], texts: list[str], group: int) -> str | None:
    """Text of another correct, untruncated rollout of the same prompt group, if any."""
    start = index - index % group
    for j in range(start, start + group):
        if j != index and correct[j] and not truncated[j]:
            return texts[j]
    return None


def incorrect_sibling(index: int, correct: list[bool], truncated: list[bool], group: int) -> int | None:
    """Index of the first other rollout of `index`'s prompt group that is incorrect and ended (not
    truncated: a complete wrong solution), or None. Groups are `group` consecutive rows."""
    start = index - index % group
    for j in range(start, start + group):
        if j != index and not correct[j] and not truncated[j]:
            return j
    return None


def _context_negatives(trainer, inputs, correct, truncated, texts) -> list[str]:
    """`unrelated_solution`: every row's prompt under `contrast_context`."""
    return [render_prompt(trainer.processing_class, _example(row), thinking=trainer.teacher_thinking,
                          context=trainer.opsd.contrast_context) for row in inputs]


def _sibling_negatives(trainer, inputs, correct, truncated, texts) -> list[str | None]:
    """`rlcsd_plugin`: every row's prompt showing an incorrect sibling rollout (`incorrect_sibling`) in
    the reference-solution block, the block its teacher prompt shows the correct one in. None for a row
    with no contrast pair: no incorrect sibling, or, under the `sibling` teacher context, no correct one
    (the teacher prompt would fall back to the reference solution)."""
    group = trainer.num_generations
    prompts = []
    for i, row in enumerate(inputs):
        wrong = incorrect_sibling(i, correct, truncated, group)
        no_positive = (trainer.opsd.teacher_context == "sibling"
                       and _correct_sibling(i, correct, truncated, texts, group) is None)
        prompts.append(None if wrong is None or no_positive else
                       render_prompt(trainer.processing_class, _example(row), thinking=trainer.teacher_thinking,
                                     context="sibling", sibling=texts[wrong]))
    return prompts


# What the negative teacher of a contrastive arm reads, per `contrastive.Variant.negative`: one prompt per
# row of a gated round, or None where the row has no contrast pair (it then carries no loss).
CONTRAST_NEGATIVES: dict[str, Callable] = {
    "contrast_context": _context_negatives,
    "incorrect_sibling": _sibling_negatives,
}


def run_opsd(model, tokenizer, examples, verifier: VerifierConfig, config: OPSDStageConfig, stage_dir: Path, *,
             thinking: bool, seed: int = 0, check_examples: list[Example] | None = None, label: str = "opsd") -> Path:
    """Distil on gated rollouts of `examples`, resume from a checkpoint if any, save to stage_dir/model.

    Logged numbers go to stage_dir/metrics.jsonl; the terminal shows a bar labelled `label` (the
    pipeline's `opsd <arm> s<seed>`, `progress.stage_label`) with loss, kept fraction and completion length.
    With `config.check_every > 0`, `check_examples` (held-out problems) are graded during training, a
    stopping rule may end it, and model/ holds the checkpoint the selection rule picks (`checks`).
    stage_dir/updates.json counts its optimizer steps and those skipped because the gate kept no rollout
    (`runtime.skipped_note`): a stage that skipped them all has trained nothing.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # every process holds the same config; one writes it
        (stage_dir / "opsd_config.json").write_text(json.dumps(asdict(config), indent=2))
    eos = end_token_ids(tokenizer, model)
    with colocated_engine_released() as track:
        trainer = track(OPSDTrainer(
            model=model,
            reward_funcs=[VerifierReward(verifier, eos)],
            args=opsd_args(config, stage_dir, seed),
            train_dataset=opsd_dataset(examples, tokenizer, thinking),
            processing_class=tokenizer,
            callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl")],
            peft_config=peft_config(config),
            opsd=config,
            student_thinking=thinking,
            token_stats_path=stage_dir / "token_stats.jsonl",
        ))
        warn_if_updates_vanish(trainer, "opsd")
        check = attach_checks(trainer, config, stage_dir, check_examples, verifier, thinking=thinking, stage="opsd",
                              label=label)
        train_checked(trainer, check, lambda: train_stage(trainer, stage_dir, label, OPSD_POSTFIX))
        if trainer.state.global_step:  # (0: a stage its stopping rule ended before, not trained now)
            write_updates(stage_dir, trainer.state.global_step, trainer.skipped_steps,
                          f"the {config.gate} gate kept no rollout in them")
        if not config.lora_r:
            return save_trained(trainer, stage_dir / "model")
        # A plain HF folder that vLLM serves directly; the adapter stays in checkpoints/.
        model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            save_policy(model, tokenizer, stage_dir / "model")
        trainer.accelerator.wait_for_everyone()
        return stage_dir / "model"
