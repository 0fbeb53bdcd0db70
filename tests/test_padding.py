"""Padded batches scored without a tokens x tokens attention mask (`modeling.padding`): the row shifts and
rolls by hand, the same hidden states and gradients as the masked forward, no mask reaching attention in
any stage's training forward, and the forwards it must leave alone."""

import contextlib

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from opsdlab.modeling.models import TINY_ARCHITECTURES, build_tiny_model, final_hidden
from opsdlab.modeling.padding import left_aligned, roll_rows, row_shifts

# Left padding (row 0, 3 tokens), none (row 1), both sides (row 2), right only (row 3).
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])


def small_model(attention: str = "sdpa", seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=50, pad_token_id=0,
                         attn_implementation=attention)
    return Qwen3ForCausalLM(config).float()


@contextlib.contextmanager
def attention_calls():
    """Every call of torch's scaled_dot_product_attention: (grad enabled, a mask given, is_causal, query length)."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        calls.append((torch.is_grad_enabled(), attn_mask is not None, is_causal, query.shape[-2]))
        return original(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def test_row_shifts_by_hand():
    shifts = row_shifts(MASK)
    assert shifts.shifts.tolist() == [3, 0, 1, 0] and shifts.moved
    right_only = row_shifts(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert right_only.shifts.tolist() == [0, 0] and not right_only.moved  # no roll, but no mask either
    assert row_shifts(torch.ones(2, 4, dtype=torch.long)) is None  # no padding: transformers builds no mask
    assert row_shifts(torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])) is None  # a hole: causal attention is not exact
    assert row_shifts(torch.tensor([[0, 0, 0], [0, 1, 1]])).shifts.tolist() == [0, 1]  # an empty row stays put


def test_roll_rows_by_hand_and_back():
    values = torch.arange(8).view(2, 4)
    rolled = roll_rows(values, torch.tensor([1, 3]))
    assert rolled.tolist() == [[1, 2, 3, 0], [7, 4, 5, 6]]
    assert torch.equal(roll_rows(rolled, torch.tensor([1, 3]), inverse=True), values)
    hidden = torch.randn(2, 4, 3)
    assert torch.equal(roll_rows(hidden, torch.tensor([2, 0]))[0, 0], hidden[0, 2])


def test_padded_rows_score_as_the_masked_forward_and_as_alone():
    model = small_model()
    ids = torch.randint(1, 50, MASK.shape)
    real = MASK.bool()
    masked = model(input_ids=ids, attention_mask=MASK, use_cache=False).logits
    with left_aligned(model):
        aligned = model(input_ids=ids, attention_mask=MASK, use_cache=False).logits
    assert torch.allclose(aligned[real], masked[real], atol=1e-5)
    # A row scores as it does alone, counted from its first real token, as generation positions it.
    alone = model(input_ids=ids[0, 3:8].unsqueeze(0), use_cache=False).logits[0]
    assert torch.allclose(aligned[0, 3:8], alone, atol=1e-5)


def test_gradients_equal_the_masked_forward():
    ids = torch.randint(1, 50, MASK.shape)
    weights = torch.randn(*MASK.shape, 50) * MASK.unsqueeze(-1)
    grads = []
    for aligned in (False, True):
        model = small_model()
        with left_aligned(model) if aligned else contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=MASK, use_cache=False).logits
        (logits.log_softmax(-1) * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-5, rtol=1e-4), name


def test_no_mask_reaches_attention_and_final_hidden_reads_the_original_layout():
    model = small_model()
    ids = torch.randint(1, 50, MASK.shape)
    with attention_calls() as calls:
        expected = model(input_ids=ids, attention_mask=MASK, output_hidden_states=True, use_cache=False).hidden_states[-1]
    assert all(mask for _, mask, _, _ in calls)  # the masked forward: a rows x tokens x tokens mask per layer
    with attention_calls() as calls:
        hidden = final_hidden(model, ids, MASK)
    assert calls and all(not mask and causal for _, mask, causal, _ in calls)
    assert torch.allclose(hidden[MASK.bool()], expected[MASK.bool()], atol=1e-5)


def test_generation_and_other_attention_are_left_alone():
    model = small_model()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, **settings)
    with left_aligned(model), attention_calls() as calls:
        inside = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(inside, plain)
    assert calls[0][1]  # the prefill keeps its mask: the KV cache holds the original layout
    with left_aligned(model), attention_calls() as calls:  # given positions: the caller's layout is kept
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(6).expand(2, -1), use_cache=False)
    assert calls and all(masked for _, masked, _, _ in calls)
    eager = small_model("eager")
    with left_aligned(eager):
        out = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(out, eager(input_ids=ids, attention_mask=mask, use_cache=False).logits)


# ------------------------------------------------------------------ every stage's training forwards


def masked_training_calls(calls) -> tuple[int, int]:
    """(training forwards' attention calls with a mask, without one): grad-enabled calls over more than one query."""
    training = [mask for grad, mask, _, length in calls if grad and length > 1]
    return sum(training), len(training) - sum(training)


@pytest.mark.parametrize("aligned", [True, False])
def test_rlvr_training_forwards_get_no_mask(tmp_path, tiny_folder, task, aligned, monkeypatch):
    from opsdlab.config.stages import RLVRStageConfig
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages import rlvr
    from opsdlab.tasks.verifier import VerifierConfig

    if not aligned:  # the check can fail: without the layout, the same step's forwards carry masks
        monkeypatch.setattr(rlvr, "left_aligned", lambda model: contextlib.nullcontext())
    model, tokenizer = load_policy(tiny_folder)
    config = RLVRStageConfig(max_steps=1, prompts_per_step=4, group_size=2, max_completion_length=12,
                             save_steps=100, logging_steps=1, gradient_checkpointing=True)
    trainer = rlvr.RLVRTrainer(model=model, reward_funcs=[VerifierReward(VerifierConfig(compare="exact"),
                                                                         {tokenizer.eos_token_id})],
                               args=rlvr.grpo_args(config, tmp_path, 0),
                               train_dataset=rlvr.rl_dataset(task.examples("train", 8), tokenizer, True),
                               processing_class=tokenizer)
    with attention_calls() as calls:
        trainer.train()
    masked, unmasked = masked_training_calls(calls)
    assert (masked == 0 and unmasked > 0) if aligned else masked > 0


@pytest.mark.parametrize("aligned", [True, False])
def test_opsd_training_forwards_get_no_mask(tmp_path, tiny_folder, task, aligned, monkeypatch):
    from opsd_helpers import make_trainer

    import opsdlab.modeling.models as models

    if not aligned:
        monkeypatch.setattr(models, "left_aligned", lambda model: contextlib.nullcontext())
    trainer = make_trainer(tmp_path, tiny_folder, task, max_steps=1)
    in_loss = []  # attention calls inside the loss: the student's forward and the frozen teacher's (no grad)
    compute_loss = trainer._compute_loss

    def loss_only(model, inputs):
        with attention_calls() as calls:
            out = compute_loss(model, inputs)
        in_loss.extend(calls)
        return out

    monkeypatch.setattr(trainer, "_compute_loss", loss_only)
    trainer.train()
    with_grad = [masked for grad, masked, _, _ in in_loss if grad]
    without_grad = [masked for grad, masked, _, _ in in_loss if not grad]
    assert with_grad and without_grad  # the student's forward, then the teacher's
    assert (not any(with_grad + without_grad)) if aligned else all(with_grad + without_grad)


@pytest.mark.parametrize("aligned", [True, False])
def test_sft_training_forwards_get_no_mask(tmp_path, tiny_folder, task, aligned, monkeypatch):
    from datasets import Dataset

    from opsdlab.config.stages import SFTStageConfig
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages import sft

    if not aligned:
        monkeypatch.setattr(sft, "left_aligned", lambda model: contextlib.nullcontext())
    model, tokenizer = load_policy(tiny_folder)
    config = SFTStageConfig(rows=16, max_steps=1, batch_size=8, save_steps=100, logging_steps=1)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in task.sft_rows(tokenizer, 16)])
    trainer = sft.SFTStageTrainer(model=model, args=sft.sft_args(config, tmp_path, 0, tokenizer.eos_token),
                                  train_dataset=dataset, processing_class=tokenizer)
    with attention_calls() as calls:
        trainer.train()
    masked, unmasked = masked_training_calls(calls)
    assert (masked == 0 and unmasked > 0) if aligned else masked > 0


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_every_family_scores_padded_rows_as_the_masked_forward(tokenizer, architecture):
    model = build_tiny_model(tokenizer, architecture=architecture).float()
    ids = torch.randint(5, len(tokenizer), MASK.shape)
    masked = model(input_ids=ids, attention_mask=MASK, use_cache=False).logits
    with left_aligned(model), attention_calls() as calls:
        aligned = model(input_ids=ids, attention_mask=MASK, use_cache=False).logits
    assert calls and not any(mask for _, mask, _, _ in calls)
    assert torch.allclose(aligned[MASK.bool()], masked[MASK.bool()], atol=1e-5)
