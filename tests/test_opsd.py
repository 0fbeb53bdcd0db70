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
