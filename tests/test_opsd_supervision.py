"""Which response tokens carry the OPSD loss (`supervised_tokens`, `position_weighting`) and the anchor to the
starting model (`anchor_beta`), through the real trainer on the tiny model."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from opsdlab.loss.divergences import per_token_divergence
from opsdlab.stages.opsd import response_positions
from opsdlab.stages.teacher import FrozenTeacher

from opsd_helpers import make_trainer, snapshot
from test_opsd_cost import PROMPT, fixed_batch, loss_and_gradient, perturbed_trainer


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class _Gradients(TrainerCallback):
    """The gradients of the first optimizer step, read just before the optimizer applies them."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step(stage_dir, tiny_folder, task, ga, settings):
    """One optimizer step of 4 prompts x 2 rollouts in `ga` micro-batches: its gradient, the loss of each
    micro-batch, and the token stats of every rollout."""
    grads = _Gradients()
    trainer = make_trainer(stage_dir, tiny_folder, task, callbacks=[grads], max_steps=1, prompts_per_step=4,
                           gradient_accumulation_steps=ga, **settings)
    trainer.token_stats_path = stage_dir / "token_stats.jsonl"
    losses = []
    compute = trainer._compute_loss

    def recording(model, inputs):
        loss = compute(model, inputs)
        losses.append(loss.item())
        return loss

    trainer._compute_loss = recording
    trainer.train()
    return grads.grads, losses, _records(stage_dir / "token_stats.jsonl")


@pytest.mark.parametrize("settings", [
    {"supervised_tokens": 3},
    {"supervised_tokens": 5, "position_weighting": "linear", "position_floor": 0.2},
    {"position_weighting": "margin_cut", "margin_window": 2},
], ids=["supervised", "linear", "margin_cut"])
def test_the_step_loss_is_the_weighted_mean_over_supervised_tokens_whatever_the_split(tmp_path, tiny_folder, task,
                                                                                     settings):
    """GA=1 and GA=2 over the same 8 rollouts: the micro-batch losses sum to sum(w x loss) / sum(w) over the
    step's supervised tokens, and the step's gradient is the same."""
    results = {ga: _one_step(tmp_path / f"ga{ga}", tiny_folder, task, ga, settings) for ga in (1, 2)}
    for ga, (_, losses, rows) in results.items():
        assert len(losses) == ga and sum(len(r["token_ids"]) for r in rows) > 0
        weighted = sum(w * l for r in rows for w, l in zip(r.get("weight", [1.0] * len(r["loss"])), r["loss"]))
        total = sum(sum(r.get("weight", [1.0] * len(r["loss"]))) for r in rows)
        assert sum(losses) == pytest.approx(weighted / total, rel=1e-3)
        limit = settings.get("supervised_tokens", math.inf)
        assert all(len(r["token_ids"]) <= limit for r in rows)
    one, two = results[1][0], results[2][0]
    assert one.keys() == two.keys() and one
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("settings, logged", [
    ({"supervised_tokens": 3}, {"opsd/supervised_fraction"}),
    ({"position_weighting": "linear", "position_floor": 0.1}, {"opsd/supervised_fraction", "opsd/mean_weight"}),
    # A threshold no trailing mean reaches: every rollout is cut at its second token (the first whole window).
    ({"position_weighting": "margin_cut", "margin_window": 2, "margin_threshold": 100.0},
     {"opsd/supervised_fraction", "opsd/mean_weight", "opsd/margin"}),
    ({"anchor_beta": 0.5}, {"opsd/anchor_kl"}),
], ids=["supervised", "linear", "margin_cut", "anchor"])
def test_each_setting_trains_and_logs_what_it_does(tmp_path, tiny_folder, task, settings, logged):
    trainer = make_trainer(tmp_path, tiny_folder, task, **settings)
    trainer.token_stats_path = tmp_path / "token_stats.jsonl"
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.skipped_steps == 0
    assert max((before[n] - p).abs().max().item() for n, p in trainer.model.named_parameters()) > 0
    records = _records(tmp_path / "metrics.jsonl")
    assert logged <= {k for r in records for k in r}
    assert all(math.isfinite(r["opsd/loss"]) for r in records if "opsd/loss" in r)
    rows = _records(tmp_path / "token_stats.jsonl")
    assert rows and all(len(r["token_ids"]) == len(r["loss"]) == len(r["logp_shift"]) for r in rows)
    if "supervised_tokens" in settings:
        assert max(len(r["token_ids"]) for r in rows) == 3
        assert all(r["opsd/supervised_fraction"] < 1 for r in records if "opsd/supervised_fraction" in r)
    if settings.get("position_weighting") == "linear":
        assert all(r["weight"][0] == 1.0 and r["weight"][-1] == pytest.approx(0.1) for r in rows
                   if len(r["weight"]) > 1)
        assert all(0.1 < r["opsd/mean_weight"] < 1 for r in records if "opsd/mean_weight" in r)
    if settings.get("position_weighting") == "margin_cut":
        assert all(len(r["token_ids"]) == 1 and r["weight"] == [1.0] for r in rows)
    if "anchor_beta" in settings:
        assert all(len(r["anchor_kl"]) == len(r["loss"]) for r in rows)
        kl = [r["opsd/anchor_kl"] for r in records if "opsd/anchor_kl" in r]
        assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # the student leaves its start


def test_the_anchor_of_a_frozen_teacher_is_the_teacher_itself(tmp_path, tiny_folder, task):
    plain = make_trainer(tmp_path / "plain", tiny_folder, task)
    anchored = make_trainer(tmp_path / "anchored", tiny_folder, task, anchor_beta=0.1)
    assert plain.anchor is None
    assert anchored.anchor is anchored.teacher  # no second copy of the starting weights


def test_the_anchor_of_an_ema_teacher_is_a_frozen_copy_of_the_start(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="ema", ema_rate=0.5, anchor_beta=0.1)
    assert isinstance(trainer.anchor, FrozenTeacher) and trainer.anchor is not trainer.teacher
    assert trainer.anchor.copy is not None and trainer.anchor.copy is not trainer.teacher.copy
    start = snapshot(trainer.model)
    trainer.train()
    anchor = dict(trainer.anchor.copy.named_parameters())
    ema = dict(trainer.teacher.copy.named_parameters())
    assert all(torch.equal(anchor[n], start[n]) for n in start)  # the anchor stays at the start
    assert max((ema[n] - start[n]).abs().max().item() for n in start) > 0  # while the EMA teacher moves


def test_the_anchor_of_a_lora_student_is_its_base(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="ema", anchor_beta=0.1, lora_r=4, lora_alpha=8,
                           max_steps=1)
    assert isinstance(trainer.anchor, FrozenTeacher) and trainer.anchor.copy is None
    assert trainer.anchor.adapter is None  # every adapter disabled: the base
    trainer.train()
    assert any("opsd/anchor_kl" in r for r in _records(tmp_path / "metrics.jsonl"))


def test_the_anchored_loss_adds_beta_times_the_mean_kl_to_the_starting_model(tmp_path, tiny_folder, task):
    """The fixed micro-batch, its student moved off the start: the loss with anchor_beta 0.5 is the loss
    without it plus 0.5 x the mean over its kept tokens of KL(student || start), computed here from the
    models' own full logits."""
    plain, _ = loss_and_gradient(perturbed_trainer(tmp_path / "plain", tiny_folder, task))
    trainer = perturbed_trainer(tmp_path / "anchored", tiny_folder, task, anchor_beta=0.5)
    anchored, _ = loss_and_gradient(trainer)
    batch = fixed_batch()
    kept = torch.tensor([0, 2])  # row 1 is gated out
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)[kept]
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)[kept]
    positions = response_positions(len(PROMPT[0]), batch["completion_ids"].shape[1])
    mask = batch["completion_mask"][kept].bool().reshape(-1)
    with torch.no_grad():
        student = trainer.model(input_ids=ids, attention_mask=attn).logits[:, positions]
        start = trainer.teacher.copy(input_ids=ids, attention_mask=attn).logits[:, positions]
    flat = lambda x: x.reshape(-1, x.shape[-1])[mask]  # noqa: E731
    kl = per_token_divergence("reverse_kl", flat(student), flat(start), ids.new_zeros(int(mask.sum())))
    assert kl.mean().item() > 1e-4
    assert anchored.item() == pytest.approx(plain.item() + 0.5 * kl.mean().item(), rel=1e-4)
