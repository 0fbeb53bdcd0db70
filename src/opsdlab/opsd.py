"""OPSD stage: on-policy self-distillation toward a privileged self-teacher, gated by rollout outcome.

Objective: for each kept response token t, D(p_S(.|x, y<t) || p_T(.|x, c, y<t)) (reverse KL by
default; see `divergences.DIVERGENCES`), averaged over kept response tokens, gradient through the
student only. The student samples y from the problem x alone; the teacher is the same network
(`teacher.TEACHER_WEIGHTS`) reading the privileged context c (`prompts.TEACHER_CONTEXTS`); both
score the same response token ids. Rollouts are graded by the one verifier and gated
(`gates.GATES`) before any forward pass.

Generation, reward bookkeeping, accelerate, PEFT, vLLM and logging are TRL's GRPOTrainer; this
subclass replaces the policy-gradient loss by the distillation loss. Departures from the paper:
TRL requires at least 2 rollouts per prompt (the authors used 1); the loss is a mean per
micro-batch of kept tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from trl import GRPOTrainer
from transformers import TrainerCallback

from opsdlab.data import Example
from opsdlab.divergences import DIVERGENCES, DivergenceOptions, chunked_divergence
from opsdlab.gates import GATES, route
from opsdlab.models import save_policy
from opsdlab.prompts import TEACHER_CONTEXTS, render_prompt
from opsdlab.rewards import VerifierReward
from opsdlab.rlvr import RLVRStageConfig, grpo_args, rl_dataset
from opsdlab.runtime import JsonlMetrics, resume_point
from opsdlab.teacher import TEACHER_WEIGHTS, build_teacher
from opsdlab.verifier import VerifierConfig


@dataclass(frozen=True)
class OPSDStageConfig:
    gate: str = "correct"
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    clip_tau: float | None = None
    top_k: int | None = None
    teacher_weights: str = "frozen"
    ema_rate: float = 0.05
    teacher_context: str = "solution"
    teacher_thinking: bool | None = None  # None: same as the student (the run's thinking setting)
    max_steps: int = 40
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 4
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    max_completion_length: int = 192
    temperature: float = 1.0
    chunk_size: int = 1024
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    save_steps: int = 20
    logging_steps: int = 5
    report_to: str = "none"
    token_stats_rows: int = 8  # rollouts per step whose per-token teacher/student numbers are kept
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (the frozen teacher is then the base, adapters off)
    lora_alpha: int = 128
    lora_target_modules: str = "all-linear"
    train_problems: int = 4000

    def __post_init__(self):
        for name, value, valid in (("gate", self.gate, GATES), ("divergence", self.divergence, DIVERGENCES),
                                   ("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS),
                                   ("teacher_context", self.teacher_context, TEACHER_CONTEXTS)):
            if value not in valid:
                raise ValueError(f"opsd: {name} must be one of {sorted(valid)}, got {value!r}")
        if self.rollouts_per_prompt < 2:
            raise ValueError("opsd: rollouts_per_prompt must be >= 2 (TRL's generation groups)")
        if self.lora_r < 0:
            raise ValueError(f"opsd: lora_r must be >= 0, got {self.lora_r}")
        if self.chunk_size < 1 or self.max_steps < 1 or self.prompts_per_step < 1:
            raise ValueError("opsd: chunk_size, max_steps and prompts_per_step must be >= 1")
        self.divergence_options()  # validates beta, clip_tau, top_k

    def divergence_options(self) -> DivergenceOptions:
        return DivergenceOptions(beta=self.jsd_beta, clip_tau=self.clip_tau, top_k=self.top_k)

    def peft_config(self):
        """A PEFT LoraConfig when lora_r > 0, else None (full fine-tuning)."""
        if self.lora_r == 0:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=self.lora_target_modules,
                          task_type="CAUSAL_LM")

    def as_rlvr(self) -> RLVRStageConfig:
        """The generation/optimizer settings expressed for TRL's GRPOConfig builder."""
        return RLVRStageConfig(
            max_steps=self.max_steps, prompts_per_step=self.prompts_per_step, group_size=self.rollouts_per_prompt,
            learning_rate=self.learning_rate, lr_scheduler_type=self.lr_scheduler_type,
            max_completion_length=self.max_completion_length, temperature=self.temperature,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            gradient_checkpointing=self.gradient_checkpointing, use_vllm=self.use_vllm, vllm_mode=self.vllm_mode,
            save_steps=self.save_steps, logging_steps=self.logging_steps, report_to=self.report_to,
        )


def response_positions(prompt_width: int, completion_width: int) -> slice:
    """Positions whose next-token distribution scores completion tokens 0..C-1.

    Inputs are [left-padded prompt | right-padded completion]; the hidden state at position i
    predicts token i+1, so completion token j (at prompt_width + j) is scored at prompt_width + j - 1.
    """
    return slice(prompt_width - 1, prompt_width - 1 + completion_width)


def scored_token_ids(input_ids: torch.Tensor, prompt_width: int, completion_width: int) -> torch.Tensor:
    """The token ids that the positions of `response_positions` are trained to predict."""
    return input_ids[:, prompt_width:prompt_width + completion_width]


def check_same_response_tokens(student_ids, teacher_ids, student_prompt_width, teacher_prompt_width,
                               completion_mask) -> None:
    """Raise if student and teacher sequences do not score identical response token ids."""
    width = completion_mask.shape[1]
    student = scored_token_ids(student_ids, student_prompt_width, width)
    teacher = scored_token_ids(teacher_ids, teacher_prompt_width, width)
    mask = completion_mask.bool()
    if student.shape != teacher.shape or not torch.equal(student[mask], teacher[mask]):
        raise RuntimeError("OPSD alignment: teacher and student would score different response tokens; "
                           "check prompt padding and the chat template")


def final_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """Final (post-norm) hidden states without materializing full-vocabulary logits."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                   logits_to_keep=1, use_cache=False)
    return output.hidden_states[-1]


class _TeacherUpdate(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.teacher.after_step(self.trainer.accelerator.unwrap_model(self.trainer.model))


class OPSDTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is outcome-gated self-distillation toward a privileged teacher."""

    def __init__(self, *args, opsd: OPSDStageConfig, student_thinking: bool, token_stats_path: Path | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.opsd = opsd
        self.teacher_thinking = student_thinking if opsd.teacher_thinking is None else opsd.teacher_thinking
        self.teacher = build_teacher(opsd.teacher_weights, self.accelerator.unwrap_model(self.model), opsd.ema_rate)
        self.divergence_options = opsd.divergence_options()
        self.token_stats_path = token_stats_path
        self.skipped_steps = 0
        self.add_callback(_TeacherUpdate(self))

    # -------------------------------------------------------------- rollouts -> gated batch
    def _generate_and_score_completions(self, inputs):
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
        encoded = self.processing_class(teacher_prompts, return_tensors="pt", padding=True, padding_side="left",
                                        add_special_tokens=False).to(batch["prompt_ids"].device)
        batch.update(teacher_prompt_ids=encoded["input_ids"], teacher_prompt_mask=encoded["attention_mask"],
                     route=routes, correct=torch.tensor(correct), truncated=torch.tensor(truncated))
        mode = "train" if self.model.training else "eval"
        kept = sum(r is not None for r in routes)
        self._metrics[mode]["opsd/kept_fraction"].append(kept / len(routes))
        return batch

    # -------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        keep = [i for i, r in enumerate(inputs["route"]) if r is not None]
        if not keep:
            self.skipped_steps += 1
            self._metrics[mode]["opsd/skipped_steps"].append(self.skipped_steps)
            # Zero loss attached to the graph: the optimizer step is a no-op, never a division by zero.
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        rows = torch.tensor(keep, device=inputs["prompt_ids"].device)
        completion_ids = inputs["completion_ids"][rows]
        completion_mask = inputs["completion_mask"][rows]
        if "tool_mask" in inputs:
            completion_mask = completion_mask * inputs["tool_mask"][rows]
        student_ids = torch.cat([inputs["prompt_ids"][rows], completion_ids], dim=1)
        student_attn = torch.cat([inputs["prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
        teacher_ids = torch.cat([inputs["teacher_prompt_ids"][rows], completion_ids], dim=1)
        teacher_attn = torch.cat([inputs["teacher_prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
        s_width, t_width, c_width = inputs["prompt_ids"].shape[1], inputs["teacher_prompt_ids"].shape[1], completion_ids.shape[1]
        check_same_response_tokens(student_ids, teacher_ids, s_width, t_width, completion_mask)

        student_hidden = final_hidden(model, student_ids, student_attn)[:, response_positions(s_width, c_width)]
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), self.teacher.use(unwrapped) as teacher_model:
            teacher_hidden = final_hidden(teacher_model, teacher_ids, teacher_attn)[:, response_positions(t_width, c_width)]
            teacher_head = teacher_model.get_output_embeddings()
        mask = completion_mask.bool()
        names = [inputs["route"][i] for i in keep]
        token_names = [names[r] for r in range(len(keep)) for _ in range(int(mask[r].sum()))]
        loss_sum, stats = chunked_divergence(
            student_hidden[mask], teacher_hidden[mask].detach(), unwrapped.get_output_embeddings(), teacher_head,
            completion_ids[mask], token_names, self.divergence_options, chunk_size=self.opsd.chunk_size,
        )
        tokens = int(mask.sum())
        loss = loss_sum / max(tokens, 1)

        metrics = self._metrics[mode]
        metrics["opsd/loss"].append(loss.item())
        metrics["opsd/kept_tokens"].append(float(tokens))
        metrics["opsd/student_entropy"].append(stats["student_entropy_N"].mean().item())
        metrics["opsd/teacher_entropy"].append(stats["teacher_entropy_N"].mean().item())
        metrics["opsd/teacher_minus_student_logp"].append(
            (stats["teacher_logp_N"] - stats["student_logp_N"]).mean().item())
        metrics["opsd/skipped_steps"].append(self.skipped_steps)
        if mode == "train":
            self._write_token_stats(completion_ids, mask, stats, names, inputs["correct"][rows])
        return loss

    def _write_token_stats(self, completion_ids, mask, stats, names, correct) -> None:
        """Per-token numbers of a few rollouts: the report ranks tokens and draws KL by position."""
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
                }) + "\n")


def _example(row: dict) -> Example:
    return Example(id=str(row.get("id", "")), problem=row["problem"], solution=row.get("solution", ""),
                   answer=str(row["answer"]))


def _correct_sibling(index: int, correct: list[bool], truncated: list[bool], texts: list[str], group: int) -> str | None:
    """Text of another correct, untruncated rollout of the same prompt group, if any."""
    start = index - index % group
    for j in range(start, start + group):
        if j != index and correct[j] and not truncated[j]:
            return texts[j]
    return None


def run_opsd(model, tokenizer, examples, verifier: VerifierConfig, config: OPSDStageConfig, stage_dir: Path, *,
             thinking: bool, seed: int = 0) -> Path:
    """Distil on gated rollouts of `examples`, resume from a checkpoint if any, save to stage_dir/model."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "opsd_config.json").write_text(json.dumps(asdict(config), indent=2))
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    trainer = OPSDTrainer(
        model=model,
        reward_funcs=[VerifierReward(verifier, eos)],
        args=grpo_args(config.as_rlvr(), stage_dir, seed),
        train_dataset=rl_dataset(examples, tokenizer, thinking),
        processing_class=tokenizer,
        callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl")],
        peft_config=config.peft_config(),
        opsd=config,
        student_thinking=thinking,
        token_stats_path=stage_dir / "token_stats.jsonl",
    )
    trainer.train(resume_from_checkpoint=resume_point(stage_dir))
    model = trainer.model
    if config.lora_r:  # save a plain HF folder that vLLM serves directly; the adapter stays in checkpoints/
        model = trainer.accelerator.unwrap_model(model).merge_and_unload()
    return save_policy(model, tokenizer, stage_dir / "model")
