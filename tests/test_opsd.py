"""OPSD stage: alignment invariant, loss position bookkeeping, and tiny training runs."""

import json

import pytest
import torch

from opsdlab.models import load_policy
from opsdlab.opsd import (OPSDStageConfig, check_same_response_tokens, final_hidden, response_positions,
                          run_opsd)
from opsdlab.verifier import VerifierConfig

EXACT = VerifierConfig(extract="last_boxed", compare="exact")


def test_response_positions_score_exactly_the_completion_tokens(tiny_folder):
    """Hidden states at response_positions reproduce the model's own logits for each completion token."""
    model, _ = load_policy(tiny_folder)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [0, 8, 9, 10, 11]])
    prompt_mask = (prompt != 0).long()
    completion = torch.tensor([[12, 13, 14], [15, 16, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, attn = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        hidden = final_hidden(model, ids, attn)[:, response_positions(5, 3)]
        logits = model(input_ids=ids, attention_mask=attn).logits
    expected = logits[:, 4:7]
    assert torch.allclose(model.get_output_embeddings()(hidden), expected, atol=1e-5)


def test_alignment_check_catches_shifted_teacher_sequences():
    completion = torch.tensor([[7, 8, 9]])
    mask = torch.ones(1, 3, dtype=torch.long)
    student = torch.cat([torch.tensor([[1, 2]]), completion], 1)
    teacher = torch.cat([torch.tensor([[1, 3, 4, 2]]), completion], 1)
    check_same_response_tokens(student, teacher, 2, 4, mask)
    with pytest.raises(RuntimeError, match="alignment"):
        check_same_response_tokens(student, teacher, 2, 3, mask)  # off by one: a padding bug


def _run(tmp_path, tiny_folder, task, **overrides):
    settings = dict(max_steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=12,
                    learning_rate=1e-3, save_steps=100, logging_steps=1)
    settings.update(overrides)
    config = OPSDStageConfig(**settings)
    model, tokenizer = load_policy(tiny_folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, tmp_path / "opsd", thinking=True)
    after, _ = load_policy(out)
    moved = max((after.state_dict()[n] - p).abs().max().item() for n, p in before.items())
    records = [json.loads(line) for line in (tmp_path / "opsd" / "metrics.jsonl").read_text().splitlines()]
    return moved, records


@pytest.mark.parametrize("divergence", ["reverse_kl", "sampled_reverse_kl"])
def test_opsd_all_gate_trains_and_logs(tmp_path, tiny_folder, task, divergence):
    moved, records = _run(tmp_path, tiny_folder, task, gate="all", divergence=divergence)
    assert moved > 0
    logged = {k for r in records for k in r}
    assert {"opsd/loss", "opsd/kept_fraction", "opsd/student_entropy", "opsd/teacher_entropy",
            "rollouts/accuracy", "rollouts/truncation_rate"} <= logged
    stats = (tmp_path / "opsd" / "token_stats.jsonl").read_text().splitlines()
    row = json.loads(stats[0])
    assert len(row["token_ids"]) == len(row["loss"]) == len(row["logp_shift"])


def test_step_with_no_kept_rollout_is_skipped_not_an_error(tmp_path, tiny_folder, task):
    """A random model solves nothing: the correct-only gate drops every rollout and the weights stay put."""
    moved, records = _run(tmp_path, tiny_folder, task, gate="correct")
    assert moved == 0
    assert max(r.get("opsd/skipped_steps", 0) for r in records) >= 1
    assert all(r.get("opsd/kept_fraction", 0) == 0 for r in records if "opsd/kept_fraction" in r)


def test_lora_run_saves_a_merged_plain_folder(tmp_path, tiny_folder, task):
    moved, records = _run(tmp_path, tiny_folder, task, gate="all", lora_r=4, lora_alpha=8, learning_rate=1e-2)
    assert moved > 0
    assert not (tmp_path / "opsd" / "model" / "adapter_config.json").exists()


def test_frozen_teacher_of_a_lora_student_is_the_base_with_adapters_off(tiny_folder):
    from peft import LoraConfig, get_peft_model

    from opsdlab.teacher import build_teacher

    base, _ = load_policy(tiny_folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = base(ids).logits
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    teacher = build_teacher("frozen", student)
    assert teacher.copy is None  # no second copy of the weights
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, expected, atol=1e-4)  # the adapters change the student
        with teacher.use(student) as model:
            assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_ema_teacher_moves_toward_the_student(tiny_folder):
    from opsdlab.teacher import build_teacher

    student, _ = load_policy(tiny_folder)
    teacher = build_teacher("ema", student, rate=0.5)
    first = next(student.parameters())
    with torch.no_grad():
        first.add_(1.0)
    teacher.after_step(student)
    teacher_first = next(teacher.copy.parameters())
    assert torch.allclose(teacher_first, first - 0.5)
