"""The contrastive method through the real OPSD trainer: the target it distils toward, by hand, and the
rlcsd_plugin variant's choice of sibling rollouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from opsd_helpers import ScriptedReward, make_trainer, snapshot
from opsdlab.stages.opsd import _example, incorrect_sibling
from opsdlab.tasks.prompts import render_prompt
from test_opsd_cost import ROUTES, fixed_batch, loss_and_gradient, perturbed_trainer

# A contrast prompt per row (left-padded, of its own width): what the teacher reads instead of the reference.
CONTRAST_PROMPT = [[0, 21, 35, 36, 22], [23, 37, 38, 24, 25], [26, 39, 27, 28, 29]]


def with_contrast(batch: dict, prompt=CONTRAST_PROMPT) -> dict:
    ids = torch.tensor(prompt)
    return {**batch, "contrast_prompt_ids": ids, "contrast_prompt_mask": (ids != 0).long()}


def contrast_loss(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def row_log_probs(model, batch, prompt_key, row, n, temperature=1.0):
    prompt = batch[prompt_key][row][batch[prompt_key][row] != 0]
    ids = torch.cat([prompt, batch["completion_ids"][row, :n]]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + n]
    return F.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("anchor, temperature", [("reference", 1.0), ("student", 1.0), ("reference", 0.5)])
def test_the_loss_distils_toward_the_contrastive_target(tmp_path, tiny_folder, task, anchor, temperature):
    """Reference: the models' own full logits (/ T), the target log q = log_softmax(a + w (ref - max(u, floor)))
    with a the reference (or the student), reverse or forward KL per kept token, mean over kept tokens."""
    weight, floor = 0.5, -5.0
    trainer = perturbed_trainer(tmp_path, tiny_folder, task, method="contrastive", contrast_anchor=anchor,
                                contrast_weight=weight, contrast_floor=floor, temperature=temperature)
    batch = with_contrast(fixed_batch())
    loss, _ = contrast_loss(trainer, batch)
    expected = []
    with torch.no_grad():
        for row, route in enumerate(ROUTES):
            if route is None:
                continue
            n = int(batch["completion_mask"][row].sum())
            student = row_log_probs(trainer.model, batch, "prompt_ids", row, n, temperature)
            reference = row_log_probs(trainer.teacher.copy, batch, "teacher_prompt_ids", row, n, temperature)
            unrelated = row_log_probs(trainer.teacher.copy, batch, "contrast_prompt_ids", row, n, temperature)
            base = reference if anchor == "reference" else student
            target = F.log_softmax(base + weight * (reference - unrelated.clamp(min=floor)), dim=-1)
            if route == "reverse_kl":
                expected.append((student.exp() * (student - target)).sum(-1))
            else:
                expected.append((target.exp() * (target - student)).sum(-1))
    assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), rel=1e-4)


def test_at_weight_zero_the_reference_anchored_target_is_plain_opsd(tmp_path, tiny_folder, task):
    plain, plain_grads = loss_and_gradient(perturbed_trainer(tmp_path / "p", tiny_folder, task))
    trainer = perturbed_trainer(tmp_path / "c", tiny_folder, task, method="contrastive", contrast_weight=0.0)
    loss, grads = contrast_loss(trainer, with_contrast(fixed_batch()))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_a_contrast_prompt_equal_to_the_reference_prompt_gives_the_student_anchor_nothing_to_learn(
        tmp_path, tiny_folder, task):
    trainer = perturbed_trainer(tmp_path, tiny_folder, task, method="contrastive", contrast_anchor="student",
                                contrast_weight=1.0, contrast_floor=None)
    batch = fixed_batch()
    loss, grads = contrast_loss(trainer, with_contrast(batch, batch["teacher_prompt_ids"].tolist()))
    assert abs(loss.item()) < 1e-5
    assert max(g.abs().max().item() for g in grads.values()) < 1e-5


def test_a_contrastive_arm_trains_with_the_contrast_prompt_of_each_row(tmp_path, tiny_folder, task):
    """Two optimizer steps through the trainer: each gated round carries the rows' contrast prompts (the
    unrelated solution's block), and the student's weights move."""
    trainer = make_trainer(tmp_path, tiny_folder, task, method="contrastive")
    seen = []
    gated_round = trainer._gated_round

    def recording(inputs):
        batch = gated_round(inputs)
        seen.append((inputs, batch))
        return batch

    trainer._gated_round = recording
    before = snapshot(trainer.model)
    trainer.train()
    assert seen and all("contrast_prompt_ids" in batch for _, batch in seen)
    inputs, batch = seen[0]
    text = trainer.processing_class.decode(batch["contrast_prompt_ids"][0][batch["contrast_prompt_mask"][0].bool()])
    assert inputs[0]["unrelated_solution"].strip().splitlines()[0] in text
    assert inputs[0]["solution"].strip().splitlines()[0] not in text
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


# --------------------------------------------------------------------------- rlcsd_plugin


def on_support(logp, support):
    """The support's log-probabilities, then the rest of the mass (the tail bucket)."""
    picked = logp.gather(-1, support)
    return torch.cat([picked, torch.log1p(-picked.exp().sum(-1, keepdim=True))], dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_the_rlcsd_plugin_loss_is_the_weighted_clipped_divergence_on_the_reference_support(
        tmp_path, tiny_folder, task, temperature):
    """Reference: the models' own full logits (/ T); the support is the reference teacher's top 5 tokens
    plus a tail bucket; q = log_softmax(1.5 c - 0.5 max(w, -5)) there; each kept token's divergence,
    entries clipped at 0.05, times KL(c || w) / (KL + 1); the mean over kept tokens."""
    k, clip = 5, 0.05
    trainer = perturbed_trainer(tmp_path, tiny_folder, task, method="contrastive", contrast_variant="rlcsd_plugin",
                                contrast_top_k=k, clip_tau=clip, temperature=temperature)
    batch = with_contrast(fixed_batch())
    loss, grads = contrast_loss(trainer, batch)
    expected = []
    with torch.no_grad():
        for row, route in enumerate(ROUTES):
            if route is None:
                continue
            n = int(batch["completion_mask"][row].sum())
            student = row_log_probs(trainer.model, batch, "prompt_ids", row, n, temperature)
            reference = row_log_probs(trainer.teacher.copy, batch, "teacher_prompt_ids", row, n, temperature)
            wrong = row_log_probs(trainer.teacher.copy, batch, "contrast_prompt_ids", row, n, temperature)
            support = reference.topk(k, dim=-1).indices
            s, c, w = (on_support(x, support) for x in (student, reference, wrong))
            q = torch.log_softmax(1.5 * c - 0.5 * w.clamp(min=-5.0), dim=-1)
            entries = s.exp() * (s - q) if route == "reverse_kl" else q.exp() * (q - s)
            kl = (c.exp() * (c - w)).sum(-1)
            expected.append(kl / (kl + 1.0) * entries.clamp(max=clip).sum(-1))
    assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), rel=1e-4)
    assert max(g.abs().max().item() for g in grads.values()) > 0


# Correctness of the 8 rollouts of each step's round (2 prompts x 4 rollouts, in groups of 4): the first
# group has two correct and two wrong, the second one correct and three wrong.
ROUND = [True, True, False, False, True, False, False, False]
# Per rollout, the sibling each teacher reads under the sibling teacher context: the first other correct
# one, and the first other incorrect one. Rollout 4 has no other correct sibling: no pair, no loss.
POSITIVE = [1, 0, 0, 0, None, 4, 4, 4]
NEGATIVE = [2, 2, 3, 2, 5, 6, 5, 5]


def test_incorrect_sibling_is_the_first_other_ended_incorrect_rollout_of_the_group():
    assert [incorrect_sibling(i, ROUND, [False] * 8, 4) for i in range(8)] == NEGATIVE
    # a truncated rollout is no complete wrong solution; a group with no other incorrect rollout has none
    truncated = [False, False, True, False, False, False, False, False]
    assert [incorrect_sibling(i, ROUND, truncated, 4) for i in range(4)] == [3, 3, 3, None]
    assert incorrect_sibling(0, [False, True], [False, False], 2) is None


def test_an_rlcsd_plugin_arm_contrasts_each_rollout_with_an_incorrect_sibling(tmp_path, tiny_folder, task):
    """Two optimizer steps through the trainer with scripted grading: every rollout's negative prompt shows
    its incorrect sibling in the reference-solution block, its teacher prompt its correct sibling; the
    rollout without a correct sibling carries no loss and is counted; the loss is finite, the weights move."""
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=ScriptedReward(lambda call, n: ROUND[:n]),
                           method="contrastive", contrast_variant="rlcsd_plugin", teacher_context="sibling",
                           gate="all", divergence="forward_kl", clip_tau=0.05, rollouts_per_prompt=4)
    seen = []
    gated_round = trainer._gated_round

    def recording(inputs):
        batch = gated_round(inputs)
        seen.append((inputs, batch))
        return batch

    trainer._gated_round = recording
    before = snapshot(trainer.model)
    trainer.train()

    def prompt_ids(inputs, row, context, sibling):
        text = render_prompt(trainer.processing_class, _example(inputs[row]), thinking=True, context=context,
                             sibling=sibling)
        return trainer._tokenize_prompts([text])[0][0]

    assert len(seen) == 2
    for inputs, batch in seen:
        texts = [trainer.processing_class.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
        assert batch["route"] == [None if p is None else "forward_kl" for p in POSITIVE]
        for row in range(8):
            if POSITIVE[row] is None:
                continue
            negative = batch["contrast_prompt_ids"][row][batch["contrast_prompt_mask"][row].bool()].tolist()
            positive = batch["teacher_prompt_ids"][row][batch["teacher_prompt_mask"][row].bool()].tolist()
            assert negative == prompt_ids(inputs, row, "sibling", texts[NEGATIVE[row]])
            assert positive == prompt_ids(inputs, row, "sibling", texts[POSITIVE[row]])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["opsd/loss"] for r in records if "opsd/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x != 0 for x in losses)
    assert [r["opsd/contrast_unpaired"] for r in records if "opsd/contrast_unpaired" in r] == [1 / 8, 1 / 8]
    assert all(0 < r["opsd/contrast_token_weight"] < 1 for r in records if "opsd/contrast_token_weight" in r)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_an_rlcsd_plugin_arm_trains_on_problems_and_answers_alone(tmp_path, tiny_folder, task):
    """Problems without reference solutions (the usual RL math sets): the rows with a contrast pair train, the
    row without one (its teacher prompt would show the missing reference) carries no loss."""
    from dataclasses import replace

    class NoSolutions:
        def examples(self, split, count):
            return [replace(e, solution="") for e in task.examples(split, count)]

    trainer = make_trainer(tmp_path, tiny_folder, NoSolutions(), reward=ScriptedReward(lambda call, n: ROUND[:n]),
                           method="contrastive", contrast_variant="rlcsd_plugin", teacher_context="sibling",
                           gate="all", divergence="forward_kl", clip_tau=0.05, rollouts_per_prompt=4)
    before = snapshot(trainer.model)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["opsd/loss"] for r in records if "opsd/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x != 0 for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
