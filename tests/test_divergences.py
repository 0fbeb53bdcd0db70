"""Tests for opsdlab.loss.divergences and opsdlab.loss.chunked: hand-computed values, gradients, chunked == naive."""

from __future__ import annotations

import math

import pytest
import torch

from opsdlab.config.divergence import DivergenceOptions
from opsdlab.loss.chunked import Anchor, chunked_divergence, naive_divergence, sampled_log_probs
from opsdlab.loss.divergences import (
    DIVERGENCES,
    per_token_divergence,
    reverse_kl,
    sampled_kl_estimate,
    sampled_reverse_kl,
    token_entropy,
)

FULL_VOCAB = ("reverse_kl", "forward_kl", "jsd")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: intra-op threads only add synchronization,
    which on a busy 2-core machine made this file ~5x slower. Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def logits_of(*probs: float) -> torch.Tensor:
    """A [1, V] float32 logit row whose softmax is ``probs``."""
    return torch.tensor([probs], dtype=torch.float64).log().float()


def value(name: str, ps, pt, y: int = 0, **opts) -> float:
    out = per_token_divergence(
        name, logits_of(*ps), logits_of(*pt), torch.tensor([y]), DivergenceOptions(**opts)
    )
    assert out.shape == (1,) and out.dtype == torch.float32
    return out.item()


# --------------------------------------------------------------------------- #
# Hand-computed values
# pS = [0.5, 0.5], pT = [0.75, 0.25] unless stated otherwise.
# --------------------------------------------------------------------------- #

PS2, PT2 = (0.5, 0.5), (0.75, 0.25)


def test_reverse_kl_two_tokens():
    # 0.5*ln(0.5/0.75) + 0.5*ln(0.5/0.25) = -0.202733 + 0.346574 = 0.143841
    assert value("reverse_kl", PS2, PT2) == pytest.approx(0.14384104, abs=1e-6)


def test_forward_kl_two_tokens():
    # 0.75*ln(0.75/0.5) + 0.25*ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812
    assert value("forward_kl", PS2, PT2) == pytest.approx(0.13081204, abs=1e-6)


def test_jsd_two_tokens_symmetric_beta():
    # M = 0.5*pT + 0.5*pS = [0.625, 0.375]
    # KL(pT||M) = 0.75*ln(0.75/0.625) + 0.25*ln(0.25/0.375) = 0.0353749
    # KL(pS||M) = 0.5*ln(0.5/0.625) + 0.5*ln(0.5/0.375)    = 0.0322693
    # JSD = 0.5*0.0353749 + 0.5*0.0322693 = 0.0338221
    assert value("jsd", PS2, PT2, beta=0.5) == pytest.approx(0.03382208, abs=1e-6)


def test_jsd_two_tokens_generalized_beta():
    # beta = 0.25: M = 0.25*pT + 0.75*pS = [0.5625, 0.4375]
    # KL(pT||M) = 0.75*ln(0.75/0.5625) + 0.25*ln(0.25/0.4375) = 0.0758621
    # KL(pS||M) = 0.5*ln(0.5/0.5625)   + 0.5*ln(0.5/0.4375)    = 0.0078742
    # JSD_0.25 = 0.25*0.0758621 + 0.75*0.0078742 = 0.0248700
    assert value("jsd", PS2, PT2, beta=0.25) == pytest.approx(0.02487004, abs=1e-6)


def test_sampled_reverse_kl_value_and_estimate():
    # y = 0: a = ln 0.75 - ln 0.5 = 0.405465; loss = -a * ln 0.5 = 0.281047
    assert value("sampled_reverse_kl", PS2, PT2, y=0) == pytest.approx(0.28104700, abs=1e-6)
    # y = 1: a = ln 0.25 - ln 0.5 = -0.693147; loss = -a * ln 0.5 = -0.480453
    assert value("sampled_reverse_kl", PS2, PT2, y=1) == pytest.approx(-0.48045301, abs=1e-6)
    # estimate = ln pS(y) - ln pT(y): y=0 -> ln(0.5/0.75) = -0.405465, y=1 -> ln 2 = 0.693147
    est = sampled_kl_estimate(
        logits_of(*PS2).repeat(2, 1), logits_of(*PT2).repeat(2, 1), torch.tensor([0, 1])
    )
    torch.testing.assert_close(est, torch.tensor([-0.40546511, 0.69314718]), atol=1e-6, rtol=0)
    assert not est.requires_grad
    # Averaging the estimate under pS gives the reverse KL: 0.5*(-0.405465) + 0.5*0.693147 = 0.143841
    assert est.mean().item() == pytest.approx(0.14384104, abs=1e-6)


def test_clipping_reverse_kl_hand_computed():
    # contributions: 0.5*ln(0.5/0.75) = -0.202733 (kept), 0.5*ln(2) = 0.346574 -> clipped to 0.05
    # total = -0.202733 + 0.05 = -0.152733 (clipping may make the value negative)
    assert value("reverse_kl", PS2, PT2, clip_tau=0.05) == pytest.approx(-0.15273255, abs=1e-6)


def test_clipping_forward_kl_hand_computed():
    # contributions: 0.75*ln(1.5) = 0.304099 -> 0.05, 0.25*ln(0.5) = -0.173287 (kept)
    # total = 0.05 - 0.173287 = -0.123287
    assert value("forward_kl", PS2, PT2, clip_tau=0.05) == pytest.approx(-0.12328680, abs=1e-6)


def test_clipping_large_tau_is_identity():
    for name in FULL_VOCAB:
        assert value(name, PS2, PT2, clip_tau=10.0) == pytest.approx(value(name, PS2, PT2), abs=1e-7)


def test_clipping_blocks_gradient_of_clipped_entries():
    # Reverse KL entry 1 (0.3466 > 0.05) is clipped; only entry 0 = pS0*(ln pS0 - ln pT0) has gradient.
    s = logits_of(*PS2).requires_grad_()
    reverse_kl(s, logits_of(*PT2), torch.tensor([0]), DivergenceOptions(clip_tau=0.05)).sum().backward()
    # d/ds_j [p0 (ln p0 - c0)] = (ln p0 - c0 + 1) * p0 (delta_0j - p_j), c0 = ln 0.75, p = [0.5, 0.5]
    g0 = (math.log(0.5 / 0.75) + 1) * 0.5 * 0.5
    torch.testing.assert_close(s.grad, torch.tensor([[g0, -g0]]), atol=1e-6, rtol=0)


def test_top_k_three_tokens():
    ps, pt = (0.5, 0.25, 0.25), (0.5, 0.3, 0.2)
    # teacher top-2 support = tokens {0, 1}; renormalized:
    #   pT' = [0.5, 0.3]/0.8 = [0.625, 0.375], pS' = [0.5, 0.25]/0.75 = [2/3, 1/3]
    # reverse KL = 2/3*ln((2/3)/0.625) + 1/3*ln((1/3)/0.375) = 0.043026 - 0.039261 = 0.0037647
    assert value("reverse_kl", ps, pt, top_k=2) == pytest.approx(0.00376467, abs=1e-6)
    # forward KL = 0.625*ln(0.625/(2/3)) + 0.375*ln(0.375/(1/3)) = 0.0038321
    assert value("forward_kl", ps, pt, top_k=2) == pytest.approx(0.00383206, abs=1e-6)
    # top-k + clip 0.01: contributions [0.043026 -> 0.01, -0.039261] -> -0.029261
    assert value("reverse_kl", ps, pt, top_k=2, clip_tau=0.01) == pytest.approx(-0.02926101, abs=1e-6)
    # full vocabulary for contrast: 0.5*ln 1 + 0.25*ln(0.25/0.3) + 0.25*ln(0.25/0.2) = 0.0102055
    assert value("reverse_kl", ps, pt) == pytest.approx(0.01020550, abs=1e-6)
    # k >= V means the full vocabulary
    assert value("reverse_kl", ps, pt, top_k=3) == pytest.approx(0.01020550, abs=1e-6)
    assert value("reverse_kl", ps, pt, top_k=50) == pytest.approx(0.01020550, abs=1e-6)


def test_top_k_gradient_only_on_support():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    reverse_kl(s, t, torch.zeros(4, dtype=torch.long), DivergenceOptions(top_k=3)).sum().backward()
    support = torch.zeros(4, 10, dtype=torch.bool).scatter_(1, t.topk(3, dim=-1).indices, True)
    assert torch.all(s.grad[~support] == 0)
    assert torch.any(s.grad[support] != 0)


def test_sampled_ignores_clip_and_top_k():
    ps, pt = (0.5, 0.25, 0.25), (0.5, 0.3, 0.2)
    base = value("sampled_reverse_kl", ps, pt, y=2)
    assert value("sampled_reverse_kl", ps, pt, y=2, clip_tau=0.01, top_k=1) == base


# --------------------------------------------------------------------------- #
# Properties
# --------------------------------------------------------------------------- #


def test_jsd_symmetric_at_half_and_mirror_for_general_beta():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    ids = torch.zeros(6, dtype=torch.long)
    half = DivergenceOptions(beta=0.5)
    torch.testing.assert_close(
        per_token_divergence("jsd", a, b, ids, half), per_token_divergence("jsd", b, a, ids, half)
    )
    # JSD_beta(pS, pT) == JSD_{1-beta}(pT, pS)
    torch.testing.assert_close(
        per_token_divergence("jsd", a, b, ids, DivergenceOptions(beta=0.3)),
        per_token_divergence("jsd", b, a, ids, DivergenceOptions(beta=0.7)),
    )
    # symmetric JSD is bounded by ln 2
    assert torch.all(per_token_divergence("jsd", a * 10, b * 10, ids, half) <= math.log(2) + 1e-6)


@pytest.mark.parametrize("name", FULL_VOCAB)
def test_zero_when_equal_and_nonnegative(name):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 13, generator=g) * 2, torch.randn(8, 13, generator=g) * 2
    ids = torch.randint(0, 13, (8,), generator=g)
    for opts in (DivergenceOptions(), DivergenceOptions(top_k=4), DivergenceOptions(beta=0.2)):
        same = per_token_divergence(name, a, a.clone(), ids, opts)
        torch.testing.assert_close(same, torch.zeros(8), atol=1e-6, rtol=0)
        assert torch.all(per_token_divergence(name, a, b, ids, opts) >= -1e-6)
    # shifting logits by a constant per row changes nothing
    torch.testing.assert_close(
        per_token_divergence(name, a + 5.0, b - 2.0, ids, DivergenceOptions()),
        per_token_divergence(name, a, b, ids, DivergenceOptions()),
        atol=1e-5,
        rtol=1e-5,
    )


def test_low_precision_inputs_computed_in_float32():
    a, b = torch.randn(3, 7).bfloat16(), torch.randn(3, 7).bfloat16()
    ids = torch.zeros(3, dtype=torch.long)
    for name in DIVERGENCES:
        out = per_token_divergence(name, a, b, ids)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, per_token_divergence(name, a.float(), b.float(), ids))
    assert token_entropy(a).dtype == torch.float32


def test_token_entropy():
    # uniform over 4 -> ln 4; [0.75, 0.25] -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    torch.testing.assert_close(token_entropy(torch.zeros(1, 4)), torch.tensor([math.log(4)]))
    assert token_entropy(logits_of(*PT2)).item() == pytest.approx(0.56233514, abs=1e-6)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #


def test_reverse_kl_gradient_matches_analytic():
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(5, 9, generator=g, dtype=torch.float64) * 2
    kl = reverse_kl(s, t, torch.zeros(5, dtype=torch.long))
    kl.sum().backward()
    ps, logps, logpt = s.softmax(-1), s.log_softmax(-1), t.log_softmax(-1)
    expected = ps * (logps - logpt - kl.detach().unsqueeze(-1))
    torch.testing.assert_close(s.grad, expected.detach(), atol=1e-12, rtol=1e-10)


def test_sampled_expected_gradient_equals_reverse_kl_gradient():
    g = torch.Generator().manual_seed(3)
    N, V = 4, 6
    s0 = torch.randn(N, V, generator=g, dtype=torch.float64)
    t = torch.randn(N, V, generator=g, dtype=torch.float64)
    ps = s0.softmax(-1)
    expected_grad = torch.zeros_like(s0)
    for y in range(V):  # exact expectation over y ~ pS
        s = s0.clone().requires_grad_()
        ids = torch.full((N,), y, dtype=torch.long)
        (ps[:, y].detach() * sampled_reverse_kl(s, t, ids)).sum().backward()
        expected_grad += s.grad
    s = s0.clone().requires_grad_()
    reverse_kl(s, t, torch.zeros(N, dtype=torch.long)).sum().backward()
    torch.testing.assert_close(expected_grad, s.grad, atol=1e-12, rtol=1e-10)
    # and the expected estimate is the reverse KL value
    est = sum(ps[:, y] * sampled_kl_estimate(s0, t, torch.full((N,), y)) for y in range(V))
    torch.testing.assert_close(est, reverse_kl(s0, t, torch.zeros(N, dtype=torch.long)))


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_teacher_gets_no_gradient(name):
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    loss = per_token_divergence(name, s, t, torch.tensor([0, 2, 4]), DivergenceOptions(clip_tau=0.5, top_k=3))
    loss.sum().backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- #
# Chunked == naive
# --------------------------------------------------------------------------- #

N_TOK, HID, VOC = 37, 8, 50


def make_problem(seed: int = 0, separate_teacher_head: bool = False):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(HID, VOC, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOC, HID, generator=g))
        head.bias.copy_(torch.randn(VOC, generator=g))
    teacher_head = head
    if separate_teacher_head:
        teacher_head = torch.nn.Linear(HID, VOC, bias=False)
        with torch.no_grad():
            teacher_head.weight.copy_(torch.randn(VOC, HID, generator=g))
    hs = torch.randn(N_TOK, HID, generator=g)
    ht = hs + 0.5 * torch.randn(N_TOK, HID, generator=g)
    ids = torch.randint(0, VOC, (N_TOK,), generator=g)
    return head, teacher_head, hs, ht, ids


def run(fn, names, opts, chunk_size, seed=0):
    head, teacher_head, hs, ht, ids = make_problem(seed)
    hs.requires_grad_()
    total, stats = fn(hs, ht, head, teacher_head, ids, names, opts, chunk_size=chunk_size)
    total.backward()
    return total.detach(), stats, hs.grad, head.weight.grad, head.bias.grad


MIXED = [("reverse_kl", "forward_kl", "jsd", "sampled_reverse_kl")[i % 4] for i in range(N_TOK)]
SPLIT = ["reverse_kl"] * 20 + ["forward_kl"] * (N_TOK - 20)
NAME_CASES = [*DIVERGENCES, "mixed", "split"]
OPTION_CASES = {
    "default": DivergenceOptions(),
    "clip": DivergenceOptions(clip_tau=0.05),
    "topk": DivergenceOptions(top_k=7),
    "clip_topk_beta": DivergenceOptions(clip_tau=0.02, top_k=5, beta=0.3),
}


@pytest.mark.parametrize("chunk_size", [5, 16, 64])
@pytest.mark.parametrize("opt_key", list(OPTION_CASES))
@pytest.mark.parametrize("name_case", NAME_CASES)
def test_chunked_matches_naive(name_case, opt_key, chunk_size):
    names = {"mixed": MIXED, "split": SPLIT}.get(name_case, name_case)
    opts = OPTION_CASES[opt_key]
    ref = run(naive_divergence, names, opts, chunk_size)
    got = run(chunked_divergence, names, opts, chunk_size)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], ref[0], **tol)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert set(got[1]) == set(ref[1]) == {
        "loss_N", "student_entropy_N", "teacher_entropy_N", "student_logp_N", "teacher_logp_N", "weight_N",
        "anchor_kl_N",
    }
    for key in ref[1]:
        assert got[1][key].shape == (N_TOK,) and not got[1][key].requires_grad
        torch.testing.assert_close(got[1][key], ref[1][key], **tol)
    for g_got, g_ref in zip(got[2:], ref[2:]):
        assert g_got is not None
        torch.testing.assert_close(g_got, g_ref, **tol)
    torch.testing.assert_close(got[1]["loss_N"].sum(), got[0], **tol)


def test_chunked_per_row_names_match_per_token_calls():
    head, _, hs, ht, ids = make_problem(4)
    opts = DivergenceOptions(clip_tau=0.1)
    total, stats = chunked_divergence(hs, ht, head, head, ids, MIXED, opts, chunk_size=6)
    with torch.no_grad():
        s, t = head(hs), head(ht)
    for i, name in enumerate(MIXED):
        expected = per_token_divergence(name, s[i : i + 1], t[i : i + 1], ids[i : i + 1], opts)
        torch.testing.assert_close(stats["loss_N"][i : i + 1], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats["student_entropy_N"], token_entropy(s))
    teacher_logp = t.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(stats["teacher_logp_N"], teacher_logp)


# --------------------------------------------------------------------------- #
# Token weights and the anchor
# --------------------------------------------------------------------------- #

# Identity heads: the "hidden states" are the logits. Token 0: pS = [0.5, 0.5], pT = [0.75, 0.25],
# anchor pA = [0.25, 0.75]; token 1: pS = [0.8, 0.2], pT = [0.5, 0.5], pA = pS.
def _two_tokens():
    student = torch.cat([logits_of(0.5, 0.5), logits_of(0.8, 0.2)])
    teacher = torch.cat([logits_of(0.75, 0.25), logits_of(0.5, 0.5)])
    anchor = torch.cat([logits_of(0.25, 0.75), logits_of(0.8, 0.2)])
    return student, teacher, anchor, torch.tensor([0, 1])


def identity(h):
    return h


@pytest.mark.parametrize("path", ["naive", "checkpointed", "gradient_in_forward"])
def test_weighted_anchored_loss_hand_computed(path):
    # KL(pS || pT): 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841; 0.8 ln 1.6 + 0.2 ln 0.4 = 0.192745.
    # KL(pS || pA): token 0 is the mirror of token 0 above, 0.143841; token 1: 0.
    # Weights [1, 0.5], beta 0.3: 1 x (0.143841 + 0.3 x 0.143841) + 0.5 x 0.192745 = 0.283366.
    student, teacher, anchor, ids = _two_tokens()
    student.requires_grad_()
    fn = naive_divergence if path == "naive" else chunked_divergence
    extra = {"head_params": []} if path == "gradient_in_forward" else {}
    total, stats = fn(student, teacher, identity, identity, ids, "reverse_kl", chunk_size=1,
                      token_weight_N=torch.tensor([1.0, 0.5]), anchor=Anchor(anchor, identity, 0.3), **extra)
    assert total.item() == pytest.approx(0.283366, abs=1e-5)
    assert stats["loss_N"].tolist() == pytest.approx([0.143841, 0.192745], abs=1e-5)  # the divergence alone
    assert stats["anchor_kl_N"].tolist() == pytest.approx([0.143841, 0.0], abs=1e-5)
    total.backward()
    # The gradient of the same sum written with the per-token divergence itself.
    reference = student.detach().clone().requires_grad_()
    expected = (torch.tensor([1.0, 0.5]) * (reverse_kl(reference, teacher, ids)
                                            + 0.3 * reverse_kl(reference, anchor, ids))).sum()
    expected.backward()
    torch.testing.assert_close(student.grad, reference.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 64])
@pytest.mark.parametrize("name_case", ["reverse_kl", "mixed"])
def test_weighted_anchored_chunked_matches_naive(name_case, chunk_size):
    names = {"mixed": MIXED}.get(name_case, name_case)
    g = torch.Generator().manual_seed(9)
    weights = torch.rand(N_TOK, generator=g)
    results = []
    for fn in (naive_divergence, chunked_divergence):
        head, teacher_head, hs, ht, ids = make_problem(3)
        anchor = Anchor(hs + 0.3 * torch.randn(N_TOK, HID, generator=torch.Generator().manual_seed(1)), head, 0.7)
        hs.requires_grad_()
        total, stats = fn(hs, ht, head, teacher_head, ids, names, DivergenceOptions(top_k=7), chunk_size=chunk_size,
                          token_weight_N=weights, anchor=anchor)
        total.backward()
        results.append((total.detach(), stats, hs.grad, head.weight.grad))
        torch.testing.assert_close(total.detach(), ((stats["loss_N"] + 0.7 * stats["anchor_kl_N"]) * weights).sum(),
                                   atol=1e-5, rtol=1e-5)
    (ref, ref_stats, *ref_grads), (got, got_stats, *got_grads) = results
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_stats["anchor_kl_N"], ref_stats["anchor_kl_N"], atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sampled_log_probs_are_the_stats_log_probs():
    head, _, hs, ht, ids = make_problem(6)
    _, stats = chunked_divergence(hs, ht, head, head, ids, "reverse_kl", chunk_size=8, temperature=0.7)
    got = sampled_log_probs(hs, head, ids, chunk_size=8, temperature=0.7)
    torch.testing.assert_close(got, stats["student_logp_N"])


def test_bad_token_weights_and_anchor_raise():
    head, _, hs, ht, ids = make_problem(7)
    with pytest.raises(ValueError, match="token_weight_N must be a float"):
        chunked_divergence(hs, ht, head, head, ids, "reverse_kl", token_weight_N=torch.ones(3))
    with pytest.raises(ValueError, match="anchor hidden states"):
        chunked_divergence(hs, ht, head, head, ids, "reverse_kl", anchor=Anchor(hs[:3], head, 1.0))


def test_chunked_teacher_side_gets_no_gradient():
    head, teacher_head, hs, ht, ids = make_problem(5, separate_teacher_head=True)
    hs.requires_grad_()
    ht.requires_grad_()
    for fn in (chunked_divergence, naive_divergence):
        total, _ = fn(hs, ht, head, teacher_head, ids, "jsd", None, chunk_size=8)
        total.backward()
        assert ht.grad is None and teacher_head.weight.grad is None
        assert hs.grad is not None and head.weight.grad is not None


def test_chunked_saves_no_vocab_sized_tensor_outside_chunks():
    """The graph built by chunked_divergence must not hold any [n, V] logits;
    only the checkpointed chunk inputs are kept. Naive does hold them (sanity)."""
    head, _, hs, ht, ids = make_problem(6)

    def largest_logit_like_saved(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        x = hs.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = fn(x, ht, head, head, ids, "reverse_kl", None, chunk_size=8)
        total.backward()
        return [s for s in shapes if len(s) == 2 and s[-1] == VOC and s[0] > 1 and s != (VOC, HID)]

    assert largest_logit_like_saved(chunked_divergence) == []
    assert largest_logit_like_saved(naive_divergence) != []


def test_empty_token_set():
    head, _, hs, ht, ids = make_problem(7)
    x = hs[:0].clone().requires_grad_()
    for fn in (chunked_divergence, naive_divergence):
        total, stats = fn(x, ht[:0], head, head, ids[:0], "reverse_kl")
        assert total.item() == 0.0 and stats["loss_N"].shape == (0,)
        total.backward()


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def test_unknown_divergence_name_lists_valid_names():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError) as err:
        per_token_divergence("kl", s, s, torch.zeros(2, dtype=torch.long))
    for name in DIVERGENCES:
        assert name in str(err.value)
    head, _, hs, ht, ids = make_problem()
    with pytest.raises(ValueError, match="valid names"):
        chunked_divergence(hs, ht, head, head, ids, ["reverse_kl"] * (N_TOK - 1) + ["nope"])
    with pytest.raises(ValueError, match="valid names"):
        naive_divergence(hs, ht, head, head, ids, "nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.0),
        dict(beta=1.0),
        dict(beta=-0.1),
        dict(beta=1.5),
        dict(beta="0.5"),
        dict(clip_tau=0.0),
        dict(clip_tau=-1.0),
        dict(clip_tau=float("inf")),
        dict(clip_tau=float("nan")),
        dict(top_k=0),
        dict(top_k=-3),
        dict(top_k=2.5),
        dict(top_k=True),
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError, match="DivergenceOptions"):
        DivergenceOptions(**kwargs)


def test_options_frozen():
    opts = DivergenceOptions()
    with pytest.raises(Exception):
        opts.beta = 0.3  # type: ignore[misc]


def test_bad_shapes_and_arguments_raise():
    s = torch.randn(2, 3)
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        per_token_divergence("reverse_kl", s, torch.randn(2, 4), ids)
    with pytest.raises(ValueError, match="sampled_ids"):
        per_token_divergence("reverse_kl", s, s, ids.float())
    with pytest.raises(ValueError, match="sampled_ids"):
        per_token_divergence("reverse_kl", s, s, torch.zeros(3, dtype=torch.long))
    head, _, hs, ht, ids = make_problem()
    with pytest.raises(ValueError, match="names has"):
        chunked_divergence(hs, ht, head, head, ids, ["reverse_kl"] * 3)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(hs, ht, head, head, ids, "reverse_kl", chunk_size=0)
    with pytest.raises(ValueError, match="tokens"):
        chunked_divergence(hs, ht[:-1], head, head, ids, "reverse_kl")
    with pytest.raises(ValueError, match="options"):
        chunked_divergence(hs, ht, head, head, ids, "reverse_kl", {"beta": 0.5})
