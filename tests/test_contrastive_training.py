"""The contrastive method through the real OPSD trainer: the target it distils toward, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opsd_helpers import make_trainer, snapshot
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
