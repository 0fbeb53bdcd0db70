"""Builders shared by the OPSD tests: a real OPSDTrainer on the tiny model, scripted grading."""

from __future__ import annotations

import torch

from opsdlab.modeling.models import load_policy
from opsdlab.config.stages import OPSDStageConfig
from opsdlab.stages.opsd import OPSDTrainer, opsd_args, opsd_dataset, peft_config
from opsdlab.loss.rewards import VerifierReward
from opsdlab.modeling.runtime import JsonlMetrics
from opsdlab.tasks.verifier import VerifierConfig

EXACT = VerifierConfig(extract="last_boxed", compare="exact")
SMALL = dict(max_steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=12,
             learning_rate=1e-2, save_steps=100, logging_steps=1, gate="all")


class ScriptedReward(VerifierReward):
    """The verifier reward, with correctness decided by `script(call_number, n_rollouts)`.

    Lets a test choose which rollouts the gate keeps (a random tiny model solves nothing).
    """

    def __init__(self, script, eos_token_ids=frozenset({1})):
        super().__init__(EXACT, set(eos_token_ids))
        self.script = script
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, answer, log_metric=None, **kwargs):
        super().__call__(prompts, completions, completion_ids, answer, log_metric=log_metric, **kwargs)
        self.calls += 1
        self.last_correct = list(self.script(self.calls, len(completions)))
        self.last_truncated = [False] * len(completions)
        return [float(c) for c in self.last_correct]


def make_trainer(stage_dir, folder, task, *, model=None, reward=None, callbacks=(), seed=0, problems=16,
                 **overrides) -> OPSDTrainer:
    """An OPSDTrainer on the tiny model of `folder`, SMALL settings updated by `overrides`."""
    config = OPSDStageConfig(**{**SMALL, **overrides})
    loaded, tokenizer = load_policy(folder)
    model = loaded if model is None else model
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return OPSDTrainer(
        model=model,
        reward_funcs=[reward or VerifierReward(EXACT, eos)],
        args=opsd_args(config, stage_dir, seed),
        train_dataset=opsd_dataset(task.examples("train", problems), tokenizer, True),
        processing_class=tokenizer,
        callbacks=[JsonlMetrics(stage_dir / "metrics.jsonl"), *callbacks],
        peft_config=peft_config(config),
        opsd=config,
        student_thinking=True,
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def record_teacher_prompts(trainer) -> list:
    """Wrap the trainer's gated round so that every (dataset row, teacher prompt token ids) it builds
    is appended to the returned list as training runs."""
    rows = []
    gated_round = trainer._gated_round

    def recording(inputs):
        batch = gated_round(inputs)
        pairs = zip(inputs, batch["teacher_prompt_ids"], batch["teacher_prompt_mask"])
        rows.extend((row, ids[mask.bool()].tolist()) for row, ids, mask in pairs)
        return batch

    trainer._gated_round = recording
    return rows
