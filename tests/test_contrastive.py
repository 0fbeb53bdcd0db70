"""Tests for opsdlab.loss.contrastive: hand-computed targets, supports and token weights on V = 2-3,
invariants, and the packed heads through chunked.chunked_divergence against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from opsdlab.loss.contrastive import (contrast_logits, contrastive_head, pack, support_head, support_target, token_weights,
                                 unpack)
from opsdlab.config.divergence import DivergenceOptions
from opsdlab.loss.chunked import chunked_divergence, naive_divergence
from opsdlab.loss.targets import with_tail


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def logits_of(*probs: float) -> torch.Tensor:
    """A [1, V] logit row whose softmax is ``probs`` (float64 so hand values compare tightly)."""
    return torch.tensor([probs], dtype=torch.float64).log()


# p_S = (1/2, 1/4, 1/4), p_T(.|ref) = (1/4, 1/2, 1/4), p_T(.|unrelated) = (1/4, 1/4, 1/2):
# the contrast log(ref / unrelated) = (0, ln 2, -ln 2).
S = logits_of(0.5, 0.25, 0.25)
R = logits_of(0.25, 0.5, 0.25)
U = logits_of(0.25, 0.25, 0.5)
IDENTITY = lambda x: x  # noqa: E731  (the "logits" scoring head)


def probs(logp: torch.Tensor) -> list[float]:
    return logp.exp().squeeze(0).tolist()


# --------------------------------------------------------------------------- hand-computed values


def test_student_anchor_hand_values():
    # w = 1: q ∝ p_S * ref/unrelated = (1/2, 1/2, 1/8) -> (4/9, 4/9, 1/9)
    assert probs(contrast_logits(S, R, U, 1.0)) == pytest.approx([4 / 9, 4 / 9, 1 / 9], abs=1e-12)
    # w = 2: q ∝ (1/2, 1/4 * 4, 1/4 * 1/4) = (1/2, 1, 1/16) -> (8/25, 16/25, 1/25)
    assert probs(contrast_logits(S, R, U, 2.0)) == pytest.approx([8 / 25, 16 / 25, 1 / 25], abs=1e-12)


def test_reference_anchor_hand_values():
    # RLCSD's guided target (1 + a) log p_c - a log p_w at a = 1: p_c^2 / p_w = (1/4, 1, 1/8)
    # -> (2/11, 8/11, 1/11)
    got = probs(contrast_logits(S, R, U, 1.0, anchor="reference"))
    assert got == pytest.approx([2 / 11, 8 / 11, 1 / 11], abs=1e-12)


def test_negative_floor_hand_values():
    # floor ln(1/3): log p_u = (ln 1/4, ln 1/4, ln 1/2) -> (ln 1/3, ln 1/3, ln 1/2); contrast
    # ref / floored unrelated = (3/4, 3/2, 1/2); q ∝ (3/8, 3/8, 1/8) -> (3/7, 3/7, 1/7)
    got = probs(contrast_logits(S, R, U, 1.0, negative_floor=math.log(1 / 3)))
    assert got == pytest.approx([3 / 7, 3 / 7, 1 / 7], abs=1e-12)


def test_reverse_kl_through_chunked_divergence_hand_value():
    # KL(p_S || q) with q = (4/9, 4/9, 1/9): 1/2 ln(9/8) + 1/4 ln(9/16) + 1/4 ln(9/4) = ln(9/8)
    student = S.clone().requires_grad_(True)
    loss, stats = chunked_divergence(
        student, pack(student, R, U), IDENTITY, contrastive_head(IDENTITY, IDENTITY, 3, 1.0),
        torch.tensor([0]), "reverse_kl",
    )
    assert loss.item() == pytest.approx(math.log(9 / 8), abs=1e-12)
    # the "teacher" statistics are the target's: entropy of (4/9, 4/9, 1/9), log q at token 0
    entropy = -(2 * 4 / 9 * math.log(4 / 9) + 1 / 9 * math.log(1 / 9))
    assert stats["teacher_entropy_N"].item() == pytest.approx(entropy, abs=1e-12)
    assert stats["teacher_logp_N"].item() == pytest.approx(math.log(4 / 9), abs=1e-12)


# --------------------------------------------------------------------------- invariants


def random_parts(n=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, v, generator=g, dtype=torch.float64) * 2 for _ in range(3)]


@pytest.mark.parametrize("anchor", ["student", "reference"])
def test_zero_weight_is_the_anchor(anchor):
    s, r, u = random_parts()
    expected = torch.log_softmax(s if anchor == "student" else r, dim=-1)
    torch.testing.assert_close(contrast_logits(s, r, u, 0.0, anchor=anchor), expected)


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_reference_equal_to_unrelated_gives_the_student(weight):
    s, r, _ = random_parts()
    torch.testing.assert_close(contrast_logits(s, r, r.clone(), weight), torch.log_softmax(s, dim=-1))


def test_reference_equal_to_unrelated_gives_zero_loss():
    s, r, _ = random_parts()
    student = s.clone().requires_grad_(True)
    loss, _ = chunked_divergence(
        student, pack(student, r, r), IDENTITY, contrastive_head(IDENTITY, IDENTITY, 11, 2.0),
        torch.zeros(5, dtype=torch.long), "reverse_kl", chunk_size=2,
    )
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("anchor", ["student", "reference"])
def test_each_part_is_shift_invariant(anchor):
    s, r, u = random_parts()
    shifts = [torch.randn(5, 1, dtype=torch.float64) * 10 for _ in range(3)]
    base = contrast_logits(s, r, u, 1.5, anchor=anchor, negative_floor=-4.0)
    shifted = contrast_logits(s + shifts[0], r + shifts[1], u + shifts[2], 1.5, anchor=anchor, negative_floor=-4.0)
    torch.testing.assert_close(shifted, base)
    assert torch.logsumexp(base, dim=-1).abs().max() < 1e-12  # normalised


def test_low_precision_logits_are_upcast():
    s, r, u = (x.to(torch.bfloat16) for x in random_parts())
    out = contrast_logits(s, r, u, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, contrast_logits(s.float(), r.float(), u.float(), 1.0))


def test_no_gradient_flows_into_the_target():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(4, 7, bias=False)
    parts = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    head = contrastive_head(lm_head, lm_head, 4, 1.0)
    packed = torch.cat(parts, dim=-1)  # deliberately not detached, unlike pack()
    target = head(packed)
    assert not target.requires_grad and target.grad_fn is None
    assert not pack(*parts).requires_grad
    # also under autograd inside a graph that does need grad elsewhere
    (target.sum() + parts[0].sum()).backward()
    assert lm_head.weight.grad is None
    assert parts[1].grad is None and parts[2].grad is None


# --------------------------------------------------------------------------- through chunked_divergence


@pytest.mark.parametrize("anchor,floor", [("student", None), ("reference", -3.0)])
def test_chunked_divergence_equals_direct_computation(anchor, floor):
    """Hidden-state scoring: student and teacher have different LM heads (a periodic teacher)."""
    torch.manual_seed(1)
    n, d, v, w = 13, 5, 9, 0.7
    student_head = torch.nn.Linear(d, v, bias=False).double()
    teacher_head = torch.nn.Linear(d, v, bias=False).double()
    h_s = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    h_r, h_u = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    ids = torch.randint(0, v, (n,))

    head = contrastive_head(student_head, teacher_head, d, w, anchor=anchor, negative_floor=floor)
    loss, stats = chunked_divergence(h_s, pack(h_s, h_r, h_u), student_head, head, ids, "reverse_kl", chunk_size=4)
    loss.backward()
    grad_h, grad_w = h_s.grad.clone(), student_head.weight.grad.clone()
    h_s.grad, student_head.weight.grad = None, None

    # direct: full [N, V] logits, target built by hand from the formula
    logp_s = torch.log_softmax(student_head(h_s), dim=-1)
    with torch.no_grad():
        logp_r = torch.log_softmax(teacher_head(h_r), dim=-1)
        logp_u = torch.log_softmax(teacher_head(h_u), dim=-1)
        if floor is not None:
            logp_u = torch.maximum(logp_u, torch.full_like(logp_u, floor))
        base = logp_s.detach() if anchor == "student" else logp_r
        logq = torch.log_softmax(base + w * (logp_r - logp_u), dim=-1)
    direct = (logp_s.exp() * (logp_s - logq)).sum()
    direct.backward()

    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(grad_h, h_s.grad)
    torch.testing.assert_close(grad_w, student_head.weight.grad)
    assert teacher_head.weight.grad is None
    torch.testing.assert_close(stats["teacher_logp_N"], logq.gather(-1, ids[:, None]).squeeze(-1))

    naive, _ = naive_divergence(h_s, pack(h_s, h_r, h_u), student_head, head, ids, "reverse_kl")
    torch.testing.assert_close(naive, direct)


def test_logits_scoring_width_is_the_vocabulary():
    s, r, u = random_parts(n=4, v=6)
    student = s.clone().requires_grad_(True)
    ids = torch.tensor([0, 1, 2, 3])
    head = contrastive_head(IDENTITY, IDENTITY, 6, 1.0)
    loss, _ = chunked_divergence(student, pack(student, r, u), IDENTITY, head, ids, "reverse_kl", chunk_size=3)
    logp_s = torch.log_softmax(s, dim=-1)
    logq = torch.log_softmax(logp_s + torch.log_softmax(r, -1) - torch.log_softmax(u, -1), dim=-1)
    torch.testing.assert_close(loss, (logp_s.exp() * (logp_s - logq)).sum())


# --------------------------------------------------------------------------- bad input


def test_unpack_returns_the_parts():
    a, b, c = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    for got, want in zip(unpack(pack(a, b, c), 3), (a, b, c)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight": -0.1}, "contrast weight must be a finite number >= 0, got -0.1"),
        ({"weight": float("nan")}, "contrast weight must be a finite number >= 0, got nan"),
        ({"weight": True}, "contrast weight must be a finite number >= 0, got True"),
        ({"anchor": "teacher"}, "contrast anchor must be one of ['student', 'reference'], got 'teacher'"),
        ({"negative_floor": 0.5}, "contrast negative_floor must be None or a finite log-probability < 0, got 0.5"),
        ({"width": 0}, "contrastive width must be a positive int, got 0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    args = {"width": 3, "weight": 1.0, **kwargs}
    with pytest.raises(ValueError) as err:
        contrastive_head(IDENTITY, IDENTITY, args.pop("width"), args.pop("weight"), **args)
    assert str(err.value) == message


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"pack needs three \[N, D\] tensors of equal shape, got student \(2, 3\), "
                                         r"teacher_ref \(2, 4\), teacher_negative \(2, 3\)"):
        pack(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    head = contrastive_head(IDENTITY, IDENTITY, 3, 1.0)
    with pytest.raises(ValueError, match=r"last dim 3 \* width = 9, got 8 \(shape \(2, 8\)\)"):
        head(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="contrast_logits needs equal shapes"):
        contrast_logits(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 4), 1.0)


# --------------------------------------------------------------------------- rlcsd_plugin: support, weights, target


def test_with_tail_hand_values():
    logp = logits_of(0.5, 0.25, 0.25)  # already normalised
    assert probs(with_tail(logp, torch.tensor([[0]]))) == pytest.approx([0.5, 0.5], abs=1e-12)
    assert probs(with_tail(logp, torch.tensor([[2, 1]]))) == pytest.approx([0.25, 0.25, 0.5], abs=1e-12)
    # the whole vocabulary as support: the tail's mass is floored at 1 - exp(-1e-7), about 1e-7
    full = with_tail(logp, torch.tensor([[0, 1, 2]])).exp()
    assert full[0, :3].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-12)
    assert full[0, 3].item() == pytest.approx(1e-7, rel=1e-6)


def test_token_weights_hand_values():
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    c, w = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    kl = 0.5 * math.log(4 / 3)
    assert token_weights(c, w, 1.0).item() == pytest.approx(kl / (kl + 1), abs=1e-7)
    assert token_weights(c, w, 0.1).item() == pytest.approx(kl / (kl + 0.1), abs=1e-7)
    assert token_weights(c, c, 1.0).item() == 0.0  # the teachers agree: the token carries no loss
    assert token_weights(c, w, None).item() == 1.0


# p_S = (1/4, 1/4, 1/2), p_c = (1/2, 1/4, 1/4), p_w = (1/4, 1/2, 1/4); support: p_c's top 1 = {0}.
# On {0, tail}: s = (1/4, 3/4), c = (1/2, 1/2), w = (1/4, 3/4). The guided target at a = 1 is
# c^2 / w = (1, 1/3) -> q = (3/4, 1/4); KL(c || w) = 1/2 ln(4/3); forward KL(q || s) = 1/2 ln 3.
PS, PC, PW = logits_of(0.25, 0.25, 0.5), logits_of(0.5, 0.25, 0.25), logits_of(0.25, 0.5, 0.25)
KL_CW = 0.5 * math.log(4 / 3)


def test_support_target_hand_values():
    target = support_target(PS, PC, PW, 1.0, top_k=1)
    assert target.support_NK.tolist() == [[0]]
    assert probs(target.log_probs_NK1) == pytest.approx([0.75, 0.25], abs=1e-12)
    assert target.weight_N.item() == pytest.approx(KL_CW / (KL_CW + 1), abs=1e-12)
    assert probs(target.teacher_log_probs_NV) == pytest.approx([0.5, 0.25, 0.25], abs=1e-12)
    # the floor clamps log p_w on the support: (ln 1/4, ln 3/4) -> (ln 1/2, ln 3/4); c^2 / w = (1/2, 1/3)
    floored = support_target(PS, PC, PW, 1.0, top_k=1, negative_floor=math.log(0.5))
    assert probs(floored.log_probs_NK1) == pytest.approx([0.6, 0.4], abs=1e-12)


@pytest.mark.parametrize("clip, per_token", [(None, 0.5 * math.log(3)), (0.5, 0.5 - 0.25 * math.log(3))])
def test_support_target_loss_through_chunked_divergence_hand_value(clip, per_token):
    """Forward KL(q || s) on {0, tail}: the entries 3/4 ln 3 and -1/4 ln 3; clipped at 0.5, the first is 0.5.
    Times the token's weight; the statistics are the reference teacher's."""
    student = PS.clone().requires_grad_(True)
    head = support_head(IDENTITY, IDENTITY, 3, 1.0, top_k=1)
    loss, stats = chunked_divergence(student, pack(student, PC, PW), IDENTITY, head, torch.tensor([1]), "forward_kl",
                                     DivergenceOptions(clip_tau=clip))
    weight = KL_CW / (KL_CW + 1)
    assert loss.item() == pytest.approx(weight * per_token, abs=1e-12)
    assert stats["weight_N"].item() == pytest.approx(weight, abs=1e-12)
    assert stats["teacher_logp_N"].item() == pytest.approx(math.log(0.25), abs=1e-12)  # log p_c at token 1


def test_a_negative_equal_to_the_reference_gives_no_loss_and_no_gradient():
    s, r, _ = random_parts()
    student = s.clone().requires_grad_(True)
    head = support_head(IDENTITY, IDENTITY, 11, 0.5, negative_floor=-5.0, top_k=4)
    loss, _ = chunked_divergence(student, pack(student, r, r), IDENTITY, head, torch.zeros(5, dtype=torch.long),
                                 "forward_kl", DivergenceOptions(clip_tau=0.05), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("head_params", [False, True])
@pytest.mark.parametrize("name, clip", [("forward_kl", 0.05), ("reverse_kl", None), ("jsd", 0.2)])
def test_support_head_through_chunked_divergence_equals_direct_computation(name, clip, head_params):
    """Hidden-state scoring with different student and teacher heads, chunks of 4, with and without the
    gradient taken in the forward: loss, gradients and statistics equal a one-shot computation by hand."""
    torch.manual_seed(3)
    n, d, v, k, weight, floor, tau = 13, 5, 9, 3, 0.5, -2.0, 0.3
    student_head = torch.nn.Linear(d, v, bias=False).double()
    teacher_head = torch.nn.Linear(d, v, bias=False).double()
    h_s = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    h_c, h_w = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    ids = torch.randint(0, v, (n,))
    options = DivergenceOptions(clip_tau=clip)

    head = support_head(student_head, teacher_head, d, weight, negative_floor=floor, top_k=k, token_tau=tau)
    loss, stats = chunked_divergence(h_s, pack(h_s, h_c, h_w), student_head, head, ids, name, options, chunk_size=4,
                                     head_params=[student_head.weight] if head_params else None)
    loss.backward()
    grad_h, grad_w = h_s.grad.clone(), student_head.weight.grad.clone()
    h_s.grad, student_head.weight.grad = None, None

    logp_s = torch.log_softmax(student_head(h_s), dim=-1)
    with torch.no_grad():
        logp_c = torch.log_softmax(teacher_head(h_c), dim=-1)
        logp_w = torch.log_softmax(teacher_head(h_w), dim=-1)
        support = logp_c.topk(k, dim=-1).indices

    def on_support(logp):  # the k entries, then the rest of the mass
        picked = logp.gather(-1, support)
        return torch.cat([picked, torch.log1p(-picked.exp().sum(-1, keepdim=True))], dim=-1)

    s, c, w = on_support(logp_s), on_support(logp_c), on_support(logp_w)
    q = torch.log_softmax((1 + weight) * c - weight * w.clamp(min=floor), dim=-1)
    kl_cw = (c.exp() * (c - w)).sum(-1)
    if name == "forward_kl":
        entries = q.exp() * (q - s)
    elif name == "reverse_kl":
        entries = s.exp() * (s - q)
    else:  # jsd, beta 0.5
        m = torch.logaddexp(q + math.log(0.5), s + math.log(0.5))
        entries = 0.5 * q.exp() * (q - m) + 0.5 * s.exp() * (s - m)
    if clip is not None:
        entries = entries.clamp(max=clip)
    direct = (kl_cw / (kl_cw + tau) * entries.sum(-1)).sum()
    direct.backward()

    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(grad_h, h_s.grad)
    torch.testing.assert_close(grad_w, student_head.weight.grad)
    assert teacher_head.weight.grad is None
    torch.testing.assert_close(stats["weight_N"], kl_cw / (kl_cw + tau))
    torch.testing.assert_close(stats["teacher_logp_N"], logp_c.gather(-1, ids[:, None]).squeeze(-1))


def test_a_support_target_refuses_what_it_cannot_compute():
    student = S.clone().requires_grad_(True)
    head = support_head(IDENTITY, IDENTITY, 3, 1.0, top_k=1)
    with pytest.raises(ValueError, match="a target on a support needs one of the divergences"):
        chunked_divergence(student, pack(student, R, U), IDENTITY, head, torch.tensor([0]), "sampled_reverse_kl")
    with pytest.raises(ValueError, match="top_k must be None"):
        chunked_divergence(student, pack(student, R, U), IDENTITY, head, torch.tensor([0]), "forward_kl",
                           DivergenceOptions(top_k=2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_k": 0}, "contrast top_k must be a positive int, got 0"),
        ({"top_k": 2.5}, "contrast top_k must be a positive int, got 2.5"),
        ({"token_tau": 0.0}, "contrast token_tau must be None or a finite number > 0, got 0.0"),
        ({"token_tau": float("inf")}, "contrast token_tau must be None or a finite number > 0, got inf"),
    ],
)
def test_bad_support_settings_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        support_head(IDENTITY, IDENTITY, 3, 1.0, **kwargs)
    assert str(err.value) == message


def test_the_reference_anchor_spends_no_head_product_on_the_student_part():
    calls = []

    def student_head(x):
        calls.append(x.shape)
        return x

    for head in (contrastive_head(student_head, IDENTITY, 3, 1.0, anchor="reference"),
                 support_head(student_head, IDENTITY, 3, 1.0, top_k=1)):
        head(pack(S, R, U))
    assert calls == []
    contrastive_head(student_head, IDENTITY, 3, 1.0, anchor="student")(pack(S, R, U))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="the student anchor needs the student's logits"):
        contrast_logits(None, R, U, 1.0, anchor="student")
