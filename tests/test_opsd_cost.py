"""Cost and precision of the OPSD loss path: what it computes, in which dtype, and what it leaves out.

The loss and gradient of one fixed micro-batch are pinned to the values the loss path gave before its
cost was reduced (same tiny model, same rows), so every saving here keeps the objective exactly.
"""

from __future__ import annotations

import pytest
import torch

from opsd_helpers import make_trainer

# A fixed micro-batch: three rollouts, one gated out (route None), two divergences, left-padded
# prompts of different widths for student and teacher, right-padded completions.
PROMPT = [[0, 0, 21, 22], [0, 23, 24, 25], [26, 27, 28, 29]]
TEACHER_PROMPT = [[0, 0, 0, 21, 30, 22], [23, 31, 32, 33, 24, 25], [0, 26, 27, 34, 28, 29]]
COMPLETION = [[40, 41, 42, 43, 44], [45, 46, 47, 0, 0], [48, 49, 50, 51, 0]]
ROUTES = ["reverse_kl", None, "forward_kl"]


def fixed_batch(device="cpu") -> dict:
    def t(rows):
        return torch.tensor(rows, device=device)

    completion_mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return {
        "prompt_ids": t(PROMPT), "prompt_mask": (t(PROMPT) != 0).long(),
        "teacher_prompt_ids": t(TEACHER_PROMPT), "teacher_prompt_mask": (t(TEACHER_PROMPT) != 0).long(),
        "completion_ids": t(COMPLETION), "completion_mask": completion_mask,
        "route": list(ROUTES), "correct": t([True, False, True]), "truncated": t([False, False, False]),
        "opsd_step_tokens": torch.tensor(9.0, device=device),
        # every response token of a kept row has weight 1 (`positions.token_weights`, default settings)
        "opsd_token_weights": (completion_mask * t([[1], [0], [1]])).float(),
    }


def perturbed_trainer(tmp_path, tiny_folder, task, **overrides):
    """A trainer on the tiny model whose student is moved off the frozen teacher by a fixed small offset."""
    trainer = make_trainer(tmp_path, tiny_folder, task, chunk_size=3, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return trainer


def loss_and_gradient(trainer, routes=ROUTES):
    """The trainer's loss on the fixed batch (train mode) and the gradient it gives every parameter."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's training loop
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, {**fixed_batch(), "route": list(routes)})
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def gradient_fingerprint(grads) -> tuple[float, float, float]:
    """Total norm, and the gradient's projections on two fixed random directions."""
    generator = torch.Generator().manual_seed(2)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    projections = [sum((g.double() * torch.randn(g.shape, generator=generator, dtype=torch.float64)).sum()
                       for g in grads.values()).item() for _ in range(2)]
    return norm, *projections


# Loss, gradient fingerprint and logged numbers of the fixed batch, as the loss path computed them
# before its cost was reduced (float32 on CPU).
PINNED = {
    "kl": (["reverse_kl", None, "forward_kl"], {},
           0.0423114039003849, (0.5426812571200187, 0.5860180201931118, -0.6221163484646148)),
    "jsd_clip_topk": (["jsd", None, "sampled_reverse_kl"], {"clip_tau": 0.05, "top_k": 7, "divergence": "jsd"},
                      0.14128941297531128, (0.8172644629931514, -1.073244786168465, -0.134731347645601)),
}
PINNED_METRICS = {"opsd/kept_tokens": 9.0, "opsd/student_entropy": 5.374056339263916,
                  "opsd/teacher_entropy": 5.3809943199157715, "opsd/teacher_minus_student_logp": 0.12541463971138}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_loss_gradient_and_logged_numbers_are_pinned(tmp_path, tiny_folder, task, case):
    """Float32, one process: the loss, its gradient and the logged numbers of a fixed micro-batch (two
    kept rows of two divergences, a gated-out row, chunks of 3 tokens) match the pinned values."""
    routes, overrides, loss_value, fingerprint = PINNED[case]
    trainer = perturbed_trainer(tmp_path, tiny_folder, task, **overrides)
    loss, grads = loss_and_gradient(trainer, routes)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_value, rel=1e-5)
    assert gradient_fingerprint(grads) == pytest.approx(fingerprint, rel=1e-4)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["opsd/loss"] == pytest.approx(loss_value, rel=1e-5)  # 9 kept tokens, normalizer 9
    for key, value in PINNED_METRICS.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_vllm_rollouts_run_no_student_forward_for_importance_sampling(tmp_path, tiny_folder, task):
    """With vLLM rollouts TRL scores every generation batch again with the student (no grad) for its
    importance-sampling correction of the policy-gradient loss; the distillation loss never reads it,
    so an OPSD generation batch runs no forward pass before the loss."""
    from opsdlab.config.stages import OPSDStageConfig
    from opsdlab.stages.opsd import opsd_args

    config = OPSDStageConfig(use_vllm=True, vllm_mode="server", prompts_per_step=2, rollouts_per_prompt=2)
    assert opsd_args(config, tmp_path / "args", 0, num_processes=1).vllm_importance_sampling_correction is False
    # TRL's other reason for the forward: generation batches out of step with optimizer steps.
    accumulated = opsd_args(OPSDStageConfig(prompts_per_step=4, rollouts_per_prompt=2, gradient_accumulation_steps=2),
                            tmp_path / "ga", 0, num_processes=1)
    assert accumulated.gradient_accumulation_steps % (accumulated.steps_per_generation * accumulated.num_iterations) == 0

    trainer = make_trainer(tmp_path, tiny_folder, task)
    # As a vLLM launch: TRL's flags set, rollouts (from transformers here) carrying sampling logprobs.
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = trainer.args.vllm_importance_sampling_correction
    generate = trainer._generate_single_turn

    def as_vllm(*args, **kwargs):
        trainer.use_vllm = False
        try:
            completion_ids, _ = generate(*args, **kwargs)
        finally:
            trainer.use_vllm = True
        return completion_ids, [[-1.0] * len(ids) for ids in completion_ids]

    trainer._generate_single_turn = as_vllm
    forwards = []
    score = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: forwards.append(1) or score(*a, **k)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)])
    assert batch["completion_ids"].shape[0] == 4 and "sampling_per_token_logps" in batch
    assert forwards == [] and "old_per_token_logps" not in batch


def test_the_loss_compares_the_distributions_at_the_sampling_temperature(tmp_path, tiny_folder, task):
    """Rollouts are sampled at temperature T; as TRL's log-probabilities, both sides' logits are divided
    by T. Reference: the models' own full logits / T, reverse or forward KL per kept token, by hand."""
    import torch.nn.functional as F

    trainer = perturbed_trainer(tmp_path, tiny_folder, task, temperature=0.5)
    loss, _ = loss_and_gradient(trainer)
    batch, expected = fixed_batch(), []
    with torch.no_grad():
        for row, route in enumerate(ROUTES):
            if route is None:
                continue
            n = int(batch["completion_mask"][row].sum())
            sides = []
            for model, prompt_key in ((trainer.model, "prompt_ids"), (trainer.teacher.copy, "teacher_prompt_ids")):
                prompt = batch[prompt_key][row][batch[prompt_key][row] != 0]
                ids = torch.cat([prompt, batch["completion_ids"][row, :n]]).unsqueeze(0)
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) - 1 + n]
                sides.append(F.log_softmax(logits / 0.5, dim=-1))
            student, teacher = sides
            if route == "reverse_kl":
                expected.append((student.exp() * (student - teacher)).sum(-1))
            else:
                expected.append((teacher.exp() * (teacher - student)).sum(-1))
    reference = torch.cat(expected).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    untempered, _ = loss_and_gradient(perturbed_trainer(tmp_path / "t1", tiny_folder, task))
    assert abs(untempered.item() - reference.item()) > 0.1 * reference.item()  # T matters on this batch


def _all_layer_reference(model, ids, attn):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False).hidden_states[-1]


def test_final_hidden_asks_for_no_per_layer_hidden_states(tmp_path, tiny_folder, task):
    """The OPSD step's forwards (student and teacher) ask for no per-layer hidden states and return
    none, and the trainer's loss on the fixed batch is the pinned one."""
    trainer = perturbed_trainer(tmp_path, tiny_folder, task)
    calls = []

    def spy(module, args, kwargs, output):
        calls.append((bool(kwargs.get("output_hidden_states")), getattr(output, "hidden_states", None)))

    handles = [m.register_forward_hook(spy, with_kwargs=True) for m in (trainer.model, trainer.teacher.copy)]
    loss, _ = loss_and_gradient(trainer)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 and calls == [(False, None), (False, None)]
    assert loss.item() == pytest.approx(PINNED["kl"][2], rel=1e-5)


@pytest.mark.parametrize("wrapping", ["plain", "peft", "no_backbone"])
def test_final_hidden_is_the_models_last_hidden_state(tiny_folder, wrapping):
    """Final (post-norm) hidden states through a PEFT wrapper, and through a model whose backbone is
    not found (the all-layer forward then), equal the model's own last hidden states."""
    from peft import LoraConfig, get_peft_model

    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.opsd import final_hidden

    model, _ = load_policy(tiny_folder)
    if wrapping == "peft":
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    attn = (ids != 0).long()
    expected = _all_layer_reference(model, ids, attn)
    if wrapping == "no_backbone":
        model.base_model_prefix = "absent"
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_inputs.append(tuple(args[0].shape)))
    got = final_hidden(model, ids, attn)
    handle.remove()
    # At the real tokens: a padding position's state is not used (and, with the padded batch scored without
    # a mask, `padding.left_aligned`, not the masked forward's).
    real = attn.bool()
    assert got.shape == expected.shape and torch.allclose(got[real], expected[real], atol=1e-5)
    # The forward's own logits are never read: with a backbone the head computes none (the chunked
    # divergence applies it to the response positions later); the hook is gone afterwards.
    width = got.shape[-1]
    assert head_inputs == ([(2, 0, width)] if wrapping != "no_backbone" else [(2, 1, width)])
    assert model(input_ids=ids, attention_mask=attn, logits_to_keep=1).logits.shape[1] == 1


def _count_ops(run, names) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict.fromkeys(names, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in counts:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return counts


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "sampled_reverse_kl"])
def test_each_side_is_normalized_once_per_chunk(divergence):
    """One log-softmax per side and chunk gives the loss and the logged stats; the backward recomputes
    only the student's (the teacher side is no-grad)."""
    from opsdlab.config.divergence import DivergenceOptions
    from opsdlab.loss.chunked import chunked_divergence

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    student, teacher = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)
    ids = torch.randint(0, 50, (10,))
    options = DivergenceOptions(top_k=5) if divergence == "jsd" else None
    result = {}

    def forward():
        result["loss"], _ = chunked_divergence(student, teacher, head, head, ids, divergence, options, chunk_size=4)

    assert _count_ops(forward, ["_log_softmax"])["_log_softmax"] == 2 * 3 + (2 * 3 if divergence == "jsd" else 0)


def test_a_micro_batch_synchronizes_with_the_host_a_few_times(tmp_path, tiny_folder, task, monkeypatch):
    """Reading values back from the device (.item(), .tolist(), int(), float(), bool(), torch.equal,
    boolean-mask indexing, nonzero) stalls a GPU until its queue drains: the OPSD loss of a micro-batch
    and its backward do so a fixed few times (alignment, kept tokens, the padded layout of the student's
    and the teacher's forward, step total, logged numbers), not once per row, chunk or logged number. (The
    model's own forward is not counted.)"""
    import sys

    trainer = perturbed_trainer(tmp_path, tiny_folder, task)
    reads = []

    def note(name):
        caller = sys._getframe(2).f_code
        if "opsdlab" in caller.co_filename:
            reads.append((name, caller.co_name))

    def counting(name, real):
        def wrapper(self, *args, **kwargs):
            note(name)
            return real(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_getitem, real_equal = torch.Tensor.__getitem__, torch.equal

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
            note("mask index")
        return real_getitem(self, index)

    def equal(*args):
        note("equal")
        return real_equal(*args)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setattr(torch, "equal", equal)
    loss_and_gradient(trainer)
    monkeypatch.undo()
    assert len(reads) <= 7, reads


def _head_products(run, weight_shape) -> int:
    """Matrix products with an operand or a result of the LM head weight's shape (or its transpose), on
    non-empty operands: the head's logits, the gradient of its input and the gradient of its weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm"):
                tensors = [a for a in args if torch.is_tensor(a)] + [out]
                shapes = {tuple(weight_shape), tuple(reversed(weight_shape))}
                if all(t.numel() for t in tensors) and any(tuple(t.shape) in shapes for t in tensors):
                    count[0] += 1
            return out

    with Count():
        run()
    return count[0]


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_the_head_gradient_taken_in_the_forward_saves_the_recomputation(divergence):
    """With the head's parameters named, each chunk runs the head four times (student logits, teacher
    logits, the two gradient products) instead of six, and gives the same loss and gradients."""
    from opsdlab.loss.chunked import chunked_divergence

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    student, teacher = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)
    ids = torch.randint(0, 50, (10,))
    results = {}
    for mode, params in (("recompute", None), ("in_forward", [head.weight])):
        student.grad, head.weight.grad = None, None

        def run():
            loss, stats = chunked_divergence(student, teacher, head, head, ids, divergence, chunk_size=4,
                                             head_params=params)
            (loss * 0.5).backward()
            results[mode] = (loss.detach(), student.grad.clone(), head.weight.grad.clone(), stats["loss_N"])

        results[mode + "_products"] = _head_products(run, head.weight.shape)
    assert results["recompute_products"] == 3 * 6 and results["in_forward_products"] == 3 * 4
    for a, b in zip(results["recompute"], results["in_forward"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_an_opsd_micro_batch_runs_the_head_four_times_per_chunk(tmp_path, tiny_folder, task):
    """Through the trainer (chunks of 3 over 9 kept tokens): 3 chunks x 4 head products, loss and backward."""
    trainer = perturbed_trainer(tmp_path, tiny_folder, task)
    shape = trainer.model.get_output_embeddings().weight.shape
    assert _head_products(lambda: loss_and_gradient(trainer), shape) == 3 * 4
