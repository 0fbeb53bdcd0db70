"""The teacher signal of the ``contrastive`` method: the teacher reading the reference, contrasted
with the same teacher reading a negative context in the same template.

Plain OPSD distils the student ``p_S(. | x, y_<t)`` toward the teacher ``p_T(. | x, c, y_<t)``
that reads a reference ``c``. Much of the gap ``log p_T(c) - log p_S`` is style that *any*
privileged prompt induces (a hinted model writes shorter, more direct text), not the task
information ``c`` carries. RLCSD (Pan et al., "Reinforcement Learning with Contrastive On-Policy
Self-Distillation", arXiv 2606.11709) contrasts the teacher under the correct hint with the teacher
under a wrong one, read through an identical template::

    e_ctr = (log p_T(. | c) - log p_S) - (log p_T(. | w) - log p_S)
          =  log p_T(. | c) - log p_T(. | w)

so the shared style shift cancels. RLCSD's own method uses ``e_ctr`` at the sampled token only, as
a bounded term added to a GRPO advantage, with the negative branch averaged over several incorrect
sibling rollouts; that form is not implemented here. Its authors also plug the contrast into OPSD's
dense distillation target (``opsd_ectr`` in their released code), which is what this module builds.

The target, per response position and vocabulary entry (each part log-softmax normalised first, so
a per-row shift of any part's logits changes nothing)::

    anchor "reference" (default):  log q = log_softmax((1 + a) log p_T(.|c) - a max(log p_T(.|w), floor))
    anchor "student":              log q = log_softmax(log p_S + a (log p_T(.|c) - max(log p_T(.|w), floor)))

At ``a = 0`` the reference anchor is plain OPSD. With the student anchor, OPSD's signal
``log q - log p_S`` *is* ``a * e_ctr`` (up to the row normaliser): zero where ``c`` adds nothing
beyond ``w``. ``floor`` (the released code's ``log_w_floor``) keeps a token the negative teacher
deems impossible from an unbounded boost.

How the negative context ``w`` is chosen, and on which support the target lives, is the
``contrast_variant`` (:data:`VARIANTS`):

- ``unrelated_solution``: ``w`` is a teacher context without the reference (``contrast_context``;
  by default ``unrelated``, another problem's reference solution), the target is on the full
  vocabulary, every token weighs 1, and the arm's divergence, gate and teacher context apply as in
  OPSD. This borrows the plug-in's target but not its negative or its support: it is not RLCSD's
  released method.
- ``rlcsd_plugin``: the released ``opsd_ectr``. ``w`` is an incorrect sibling rollout of the same
  problem (the trainer picks it), ``c`` a correct sibling (teacher context ``sibling``) or the
  reference solution; the target lives on the reference teacher's top ``contrast_top_k`` tokens plus
  one tail bucket holding the rest of the mass (:func:`targets.with_tail`); each token's loss
  is multiplied by ``KL(p_c || p_w) / (KL(p_c || p_w) + tau)`` over that support
  (:func:`token_weights`), so tokens where the two teachers agree (style) carry little loss.

Integration with :func:`opsdlab.loss.chunked.chunked_divergence`: the teacher side is the packed
tensor ``[student.detach() | teacher(c) | teacher(w)]`` (:func:`pack`, hidden states or logits,
each part ``width`` wide) and the teacher head maps a packed chunk to the target: log-probabilities
``[n, V]`` (:func:`contrastive_head`; the divergence's "teacher" statistics are then those of ``q``)
or a :class:`~opsdlab.loss.targets.SupportTarget` (:func:`support_head`; its statistics are those of
``p_T(.|c)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from opsdlab.config.choices import ANCHORS
from opsdlab.loss.targets import SupportTarget, with_tail

__all__ = ["ANCHORS", "VARIANTS", "Variant", "contrast_logits", "contrastive_head", "pack", "support_head",
           "support_target", "token_weights", "unpack"]

def _upcast(x: Tensor) -> Tensor:
    """At least float32 before any softmax (bf16/fp16 -> fp32; fp64 kept), as the divergences do."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_settings(weight: float, anchor: str, negative_floor: float | None) -> None:
    if not _is_number(weight) or weight < 0:
        raise ValueError(f"contrast weight must be a finite number >= 0, got {weight!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"contrast anchor must be one of {list(ANCHORS)}, got {anchor!r}")
    if negative_floor is not None and (not _is_number(negative_floor) or negative_floor >= 0):
        raise ValueError(
            f"contrast negative_floor must be None or a finite log-probability < 0, got {negative_floor!r}"
        )


def _check_support(top_k: int, token_tau: float | None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"contrast top_k must be a positive int, got {top_k!r}")
    if token_tau is not None and (not _is_number(token_tau) or token_tau <= 0):
        raise ValueError(f"contrast token_tau must be None or a finite number > 0, got {token_tau!r}")


def contrast_logits(
    student: Tensor | None,
    teacher_ref: Tensor,
    teacher_negative: Tensor,
    weight: float,
    *,
    anchor: str = "student",
    negative_floor: float | None = None,
) -> Tensor:
    """Target log-probabilities ``[..., V]`` from the three logit tensors (see the module docstring).

    ``student``, ``teacher_ref`` (teacher reading the reference) and ``teacher_negative`` (teacher
    reading the negative context) are logits, or log-probabilities, of equal shape; ``student`` may be
    None under the reference anchor, which does not read it. The result is detached and computed in
    at least float32; it is normalised (its ``logsumexp`` over the last dim is 0).
    """
    _check_settings(weight, anchor, negative_floor)
    if student is None and anchor == "student":
        raise ValueError("contrast_logits: the student anchor needs the student's logits")
    if not ((student is None or student.shape == teacher_ref.shape) and teacher_ref.shape == teacher_negative.shape):
        raise ValueError(
            "contrast_logits needs equal shapes, got student "
            f"{None if student is None else tuple(student.shape)}, teacher_ref {tuple(teacher_ref.shape)}, "
            f"teacher_negative {tuple(teacher_negative.shape)}"
        )
    with torch.no_grad():
        logp_ref = F.log_softmax(_upcast(teacher_ref.detach()), dim=-1)
        logp_negative = F.log_softmax(_upcast(teacher_negative.detach()), dim=-1)
        if negative_floor is not None:
            logp_negative = logp_negative.clamp(min=negative_floor)
        if anchor == "student":
            base = F.log_softmax(_upcast(student.detach()), dim=-1)
        else:
            base = logp_ref
        if weight == 0:
            return base
        return F.log_softmax(base + weight * (logp_ref - logp_negative), dim=-1)


def token_weights(logp_ref: Tensor, logp_negative: Tensor, tau: float | None) -> Tensor:
    """``KL(p_ref || p_negative) / (KL + tau)`` per row (``[N]``), the KL over the last dim.

    Near 0 where the two teachers agree (a token whose distribution the reference does not change
    beyond what the negative does), near 1 where they disagree. The KL is floored at 0 (a support
    whose tail mass was floored may sum to slightly more than 1). ``tau`` None: every weight is 1.
    """
    if tau is None:
        return torch.ones(logp_ref.shape[:-1], dtype=logp_ref.dtype, device=logp_ref.device)
    kl = (logp_ref.exp() * (logp_ref - logp_negative)).sum(dim=-1).clamp(min=0.0)
    return kl / (kl + tau)


def support_target(
    student: Tensor | None,
    teacher_ref: Tensor,
    teacher_negative: Tensor,
    weight: float,
    *,
    anchor: str = "reference",
    negative_floor: float | None = None,
    top_k: int = 100,
    token_tau: float | None = 1.0,
) -> SupportTarget:
    """The ``rlcsd_plugin`` target from the three ``[N, V]`` logit tensors (see the module docstring).

    The support is the ``top_k`` most probable tokens of ``p_T(.|c)`` (all of them if ``top_k >= V``)
    plus a tail bucket; the three distributions are read on it (:func:`targets.with_tail`), the
    target is :func:`contrast_logits` of those, and each token's weight is :func:`token_weights` of
    the two teachers on it. ``student`` may be None under the reference anchor, which does not read
    it. Everything is detached and in at least float32.
    """
    _check_settings(weight, anchor, negative_floor)
    _check_support(top_k, token_tau)
    if student is None and anchor == "student":
        raise ValueError("support_target: the student anchor needs the student's logits")
    with torch.no_grad():
        logp_ref, logp_negative = (F.log_softmax(_upcast(x.detach()), dim=-1) for x in (teacher_ref, teacher_negative))
        support = logp_ref.topk(min(top_k, logp_ref.shape[-1]), dim=-1).indices
        ref_k, negative_k = with_tail(logp_ref, support), with_tail(logp_negative, support)
        student_k = None if student is None else with_tail(F.log_softmax(_upcast(student.detach()), dim=-1), support)
        target = contrast_logits(student_k, ref_k, negative_k, weight, anchor=anchor, negative_floor=negative_floor)
        return SupportTarget(support, target, token_weights(ref_k, negative_k, token_tau), logp_ref)


def pack(student: Tensor, teacher_ref: Tensor, teacher_negative: Tensor) -> Tensor:
    """``[student.detach() | teacher_ref | teacher_negative]`` on the last dim, all detached.

    The three are the ``[N, D]`` hidden states (or ``[N, V]`` logits) at the same ``N`` response
    positions: the student's from the training forward, the teacher's under the reference prompt
    and under the negative prompt. The result is ``chunked_divergence``'s teacher tensor.
    """
    if student.dim() != 2 or not (student.shape == teacher_ref.shape == teacher_negative.shape):
        raise ValueError(
            "pack needs three [N, D] tensors of equal shape, got student "
            f"{tuple(student.shape)}, teacher_ref {tuple(teacher_ref.shape)}, "
            f"teacher_negative {tuple(teacher_negative.shape)}"
        )
    return torch.cat([student.detach(), teacher_ref.detach(), teacher_negative.detach()], dim=-1)


def unpack(packed: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The three parts of a :func:`pack` ed tensor (views), each ``width`` wide."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"contrastive width must be a positive int, got {width!r}")
    if packed.shape[-1] != 3 * width:
        raise ValueError(
            f"packed contrastive tensor must have last dim 3 * width = {3 * width}, got {packed.shape[-1]} "
            f"(shape {tuple(packed.shape)})"
        )
    return packed[..., :width], packed[..., width : 2 * width], packed[..., 2 * width :]


def _packed_head(build: Callable, student_head: Callable[[Tensor], Tensor], teacher_head: Callable[[Tensor], Tensor],
                 width: int, anchor: str) -> Callable:
    """A head for ``chunked_divergence``: a packed chunk's parts through their heads, then ``build``.

    The student part goes through ``student_head`` (the model being trained) under the student
    anchor only (the reference anchor does not read it: ``build`` gets None, and no head product is
    spent on it); the two teacher parts go through ``teacher_head`` (the teacher's weights, which may
    differ). In ``"logits"`` scoring both heads are the identity and ``width`` is the vocabulary size.
    Everything runs under ``no_grad``: no gradient reaches any part or either head's weights through
    the target.
    """
    unpack(torch.empty(0, 3 * width), width)  # validates width now, not at the first chunk

    def head(packed_chunk: Tensor):
        student_part, ref_part, negative_part = unpack(packed_chunk, width)
        with torch.no_grad():
            student = student_head(student_part.detach()) if anchor == "student" else None
            return build(student, teacher_head(ref_part.detach()), teacher_head(negative_part.detach()))

    return head


def contrastive_head(
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    width: int,
    weight: float,
    *,
    anchor: str = "student",
    negative_floor: float | None = None,
) -> Callable[[Tensor], Tensor]:
    """A teacher head: packed chunk ``[n, 3 * width]`` -> full-vocabulary target ``[n, V]``
    (:func:`contrast_logits`; see :func:`_packed_head` for the parts and heads)."""
    _check_settings(weight, anchor, negative_floor)
    return _packed_head(lambda s, r, u: contrast_logits(s, r, u, weight, anchor=anchor, negative_floor=negative_floor),
                        student_head, teacher_head, width, anchor)


def support_head(
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    width: int,
    weight: float,
    *,
    anchor: str = "reference",
    negative_floor: float | None = None,
    top_k: int = 100,
    token_tau: float | None = 1.0,
) -> Callable[[Tensor], SupportTarget]:
    """A teacher head: packed chunk ``[n, 3 * width]`` -> :class:`~opsdlab.loss.targets.SupportTarget`
    (:func:`support_target`; see :func:`_packed_head` for the parts and heads)."""
    _check_settings(weight, anchor, negative_floor)
    _check_support(top_k, token_tau)
    return _packed_head(lambda s, r, u: support_target(s, r, u, weight, anchor=anchor, negative_floor=negative_floor,
                                                       top_k=top_k, token_tau=token_tau),
                        student_head, teacher_head, width, anchor)


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way to build the contrastive teacher signal (`contrast_variant`).

    `negative` names what the subtracted teacher reads (the trainer's `opsd.CONTRAST_NEGATIVES`):
    "contrast_context" (a teacher context rendered for every row) or "incorrect_sibling". `head`
    builds the teacher head from the tempered student and teacher heads, the packed width and the
    arm's settings. What a variant sets and needs of an arm's settings is `config.methods.CONTRAST_VARIANTS`.
    """

    summary: str
    negative: str
    head: Callable


VARIANTS: dict[str, Variant] = {
    "unrelated_solution": Variant(
        "the reference teacher against the teacher reading contrast_context (another problem's solution), "
        "full vocabulary",
        negative="contrast_context",
        head=lambda student_head, teacher_head, width, arm: contrastive_head(
            student_head, teacher_head, width, arm.contrast_weight, anchor=arm.contrast_anchor,
            negative_floor=arm.contrast_floor),
    ),
    "rlcsd_plugin": Variant(
        "the RLCSD authors' OPSD plug-in (opsd_ectr): a correct sibling against an incorrect sibling, "
        "top-k plus tail support, tokens weighted by KL / (KL + tau)",
        negative="incorrect_sibling",
        head=lambda student_head, teacher_head, width, arm: support_head(
            student_head, teacher_head, width, arm.contrast_weight, anchor=arm.contrast_anchor,
            negative_floor=arm.contrast_floor, top_k=arm.contrast_top_k, token_tau=arm.contrast_token_tau),
    ),
}
