"""The teacher signal of the ``contrastive`` method: reference minus unrelated reference.

Plain OPSD distils the student ``p_S(. | x, y_<t)`` toward the teacher ``p_T(. | x, c, y_<t)``
that reads the reference solution ``c``. Much of the gap ``log p_T(c) - log p_S`` is style that
*any* privileged prompt induces (a hinted model writes shorter, more direct text), not the task
information ``c`` carries. RLCSD (Pan et al., "Reinforcement Learning with Contrastive On-Policy
Self-Distillation", arXiv 2606.11709) contrasts the teacher-student gap under the correct
reference with the gap under a wrong one, read through an identical template::

    e_ctr = (log p_T(. | c) - log p_S) - (log p_T(. | u) - log p_S)
          =  log p_T(. | c) - log p_T(. | u)

so the shared style shift cancels and what ``c`` adds beyond an unrelated reference ``u``
remains. Purified OPSD (arXiv 2607.02234) subtracts a reference-only teacher for the same reason
and distils a PMI-shaped target distribution.

Here the contrast defines a target distribution at every response position, per vocabulary
entry ``v`` (each part log-softmax normalised first, so a per-row shift of any part's logits
changes nothing)::

    anchor "student" (default):   log q = log_softmax(log p_S + w * (log p_T(.|c) - log p_T(.|u)))
    anchor "reference":           log q = log_softmax(log p_T(.|c) + w * (log p_T(.|c) - log p_T(.|u)))

With the student anchor, OPSD's signal ``log q - log p_S`` *is* ``w * e_ctr`` (up to the row
normaliser): at ``w = 0`` or where ``c`` adds nothing beyond ``u`` the target is the student and
the loss is zero. The reference anchor is the CFG-style guided target of the RLCSD authors'
"OPSD + contrast" plug-in (``opsd_ectr`` in their released code: ``(1 + a) log p_c - a log p_w``),
which keeps vanilla OPSD at ``w = 0``. ``unrelated_floor`` clamps ``log p_T(.|u)`` from below
before subtracting (their ``log_w_floor``, -5 in their configs), so a token the unrelated teacher
deems impossible cannot receive an unbounded boost. RLCSD's main method uses ``e_ctr`` only at the
sampled token, squashed by ``tanh`` and clipped, to modulate a GRPO advantage; that form is not a
distribution and is not implemented here.

Integration with :func:`opsdlab.loss.divergences.chunked_divergence`, unchanged: the teacher side is
the packed tensor ``[student.detach() | teacher(c) | teacher(u)]`` (:func:`pack`, hidden states or
logits, each part ``width`` wide) and the teacher head is :func:`contrastive_head`, which maps a
packed chunk to the target's log-probabilities. The divergence's "teacher" statistics (entropy,
log-prob of the sampled token) are then those of the target ``q``, and ``DivergenceOptions.top_k``
selects the support by ``q``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ANCHORS", "contrast_logits", "contrastive_head", "pack", "unpack"]

ANCHORS = ("student", "reference")


def _upcast(x: Tensor) -> Tensor:
    """At least float32 before any softmax (bf16/fp16 -> fp32; fp64 kept), as the divergences do."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_settings(weight: float, anchor: str, unrelated_floor: float | None) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"contrast weight must be a finite number >= 0, got {weight!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"contrast anchor must be one of {list(ANCHORS)}, got {anchor!r}")
    if unrelated_floor is not None and (
        isinstance(unrelated_floor, bool)
        or not isinstance(unrelated_floor, (int, float))
        or not math.isfinite(unrelated_floor)
        or unrelated_floor >= 0
    ):
        raise ValueError(
            f"contrast unrelated_floor must be None or a finite log-probability < 0, got {unrelated_floor!r}"
        )


def contrast_logits(
    student: Tensor,
    teacher_ref: Tensor,
    teacher_unrelated: Tensor,
    weight: float,
    *,
    anchor: str = "student",
    unrelated_floor: float | None = None,
) -> Tensor:
    """Target log-probabilities ``[..., V]`` from the three logit tensors (see the module docstring).

    ``student``, ``teacher_ref`` (teacher reading the reference) and ``teacher_unrelated`` (teacher
    reading an unrelated/wrong reference) are logits of equal shape. The result is detached and
    computed in at least float32; it is normalised (its ``logsumexp`` over the last dim is 0).
    """
    _check_settings(weight, anchor, unrelated_floor)
    if not (student.shape == teacher_ref.shape == teacher_unrelated.shape):
        raise ValueError(
            "contrast_logits needs equal shapes, got student "
            f"{tuple(student.shape)}, teacher_ref {tuple(teacher_ref.shape)}, "
            f"teacher_unrelated {tuple(teacher_unrelated.shape)}"
        )
    with torch.no_grad():
        logp_ref = F.log_softmax(_upcast(teacher_ref.detach()), dim=-1)
        logp_unrelated = F.log_softmax(_upcast(teacher_unrelated.detach()), dim=-1)
        if unrelated_floor is not None:
            logp_unrelated = logp_unrelated.clamp(min=unrelated_floor)
        if anchor == "student":
            base = F.log_softmax(_upcast(student.detach()), dim=-1)
        else:
            base = logp_ref
        if weight == 0:
            return base
        return F.log_softmax(base + weight * (logp_ref - logp_unrelated), dim=-1)


def pack(student: Tensor, teacher_ref: Tensor, teacher_unrelated: Tensor) -> Tensor:
    """``[student.detach() | teacher_ref | teacher_unrelated]`` on the last dim, all detached.

    The three are the ``[N, D]`` hidden states (or ``[N, V]`` logits) at the same ``N`` response
    positions: the student's from the training forward, the teacher's under the reference prompt
    and under the unrelated prompt. The result is ``chunked_divergence``'s teacher tensor.
    """
    if student.dim() != 2 or not (student.shape == teacher_ref.shape == teacher_unrelated.shape):
        raise ValueError(
            "pack needs three [N, D] tensors of equal shape, got student "
            f"{tuple(student.shape)}, teacher_ref {tuple(teacher_ref.shape)}, "
            f"teacher_unrelated {tuple(teacher_unrelated.shape)}"
        )
    return torch.cat([student.detach(), teacher_ref.detach(), teacher_unrelated.detach()], dim=-1)


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


def contrastive_head(
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    width: int,
    weight: float,
    *,
    anchor: str = "student",
    unrelated_floor: float | None = None,
) -> Callable[[Tensor], Tensor]:
    """A teacher head for ``chunked_divergence``: packed chunk ``[n, 3 * width]`` -> target ``[n, V]``.

    The student part goes through ``student_head`` (the model being trained), the two teacher
    parts through ``teacher_head`` (the teacher's weights, which may differ); in ``"logits"``
    scoring both heads are the identity and ``width`` is the vocabulary size. Everything runs under
    ``no_grad``: no gradient reaches any part or either head's weights through the target.
    """
    _check_settings(weight, anchor, unrelated_floor)
    unpack(torch.empty(0, 3 * width), width)  # validates width now, not at the first chunk

    def head(packed_chunk: Tensor) -> Tensor:
        student_part, ref_part, unrelated_part = unpack(packed_chunk, width)
        with torch.no_grad():
            return contrast_logits(
                student_head(student_part.detach()),
                teacher_head(ref_part.detach()),
                teacher_head(unrelated_part.detach()),
                weight,
                anchor=anchor,
                unrelated_floor=unrelated_floor,
            )

    return head
