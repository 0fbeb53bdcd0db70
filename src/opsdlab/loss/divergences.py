"""Per-token divergences for on-policy self-distillation (OPSD).

In OPSD one network plays two roles on the *same* sampled response ``y``:

* the **student** reads only the problem ``x`` and gives ``p_S(. | x, y_<t)``;
* the **teacher** additionally reads a reference solution ``c`` and gives
  ``p_T(. | x, c, y_<t)``.

The training signal is a divergence between the two next-token distributions at
every kept response position. Gradients flow through the student only: the
teacher is a fixed target, so every function here detaches the teacher logits
itself instead of trusting the caller to do it.

This module is pure torch (no model, no I/O): the per-token divergence
functions with the common signature
``fn(student_logits_NV, teacher_logits_NV, sampled_ids_N, options) -> loss_N``,
registered in :data:`DIVERGENCES` and dispatched by
:func:`per_token_divergence`, with their options (:class:`DivergenceOptions`:
the JSD's beta, point-wise clipping, a top-k support). Going from hidden states
to the summed loss one row chunk at a time, without ever holding the ``(N, V)``
logits of all tokens, is :mod:`opsdlab.loss.chunked`; a teacher target on a
per-token support with a tail bucket is :mod:`opsdlab.loss.targets`.

Precision: logits are upcast to at least float32 before any softmax (bfloat16 /
float16 / float32 inputs are computed in float32; float64 inputs stay float64,
which only matters for high-precision tests). Logits must be finite: a ``-inf``
logit makes ``0 * log 0`` terms NaN.

Tensor names carry their axes as a suffix: ``N`` kept response tokens, ``V``
vocabulary (or the top-k support), ``D`` hidden size, ``K`` top-k support.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from opsdlab.config.divergence import DivergenceOptions

__all__ = [
    "DIVERGENCES",
    "DivergenceOptions",
    "forward_kl",
    "jsd",
    "per_token_divergence",
    "reverse_kl",
    "sampled_kl_estimate",
    "sampled_reverse_kl",
    "token_entropy",
]


# --------------------------------------------------------------------------- #
# Options (`DivergenceOptions`, in the config layer: an OPSD config checks them when it is built)
# --------------------------------------------------------------------------- #


_DEFAULT_OPTIONS = DivergenceOptions()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _upcast(x: Tensor) -> Tensor:
    """Return ``x`` in at least float32 (bf16/fp16 -> fp32; fp64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    if sampled_ids.shape != student_logits.shape[:1]:
        raise ValueError(
            f"sampled_ids must be [N] with N={student_logits.shape[0]}, "
            f"got shape {tuple(sampled_ids.shape)}"
        )
    if sampled_ids.dtype != torch.long:
        raise ValueError(f"sampled_ids must be torch.long, got {sampled_ids.dtype}")


def _top_k_support(logp_s_NV: Tensor, logp_t_NV: Tensor, options: DivergenceOptions) -> tuple[Tensor, Tensor]:
    """Both log-distributions renormalized over the teacher's ``top_k`` tokens (or unchanged)."""
    if options.top_k is None or options.top_k >= logp_s_NV.shape[-1]:
        return logp_s_NV, logp_t_NV
    support_NK = logp_t_NV.topk(options.top_k, dim=-1).indices
    return (F.log_softmax(logp_s_NV.gather(-1, support_NK), dim=-1),
            F.log_softmax(logp_t_NV.gather(-1, support_NK), dim=-1))


def _reverse_kl_core(logp_s_NV: Tensor, logp_t_NV: Tensor, options: DivergenceOptions) -> Tensor:
    return _reduce([(1.0, logp_s_NV.exp(), logp_s_NV - logp_t_NV)], options)


def _forward_kl_core(logp_s_NV: Tensor, logp_t_NV: Tensor, options: DivergenceOptions) -> Tensor:
    return _reduce([(1.0, logp_t_NV.exp(), logp_t_NV - logp_s_NV)], options)


def _jsd_core(logp_s_NV: Tensor, logp_t_NV: Tensor, options: DivergenceOptions) -> Tensor:
    beta = float(options.beta)
    logm_NV = torch.logaddexp(logp_t_NV + math.log(beta), logp_s_NV + math.log1p(-beta))
    return _reduce(
        [
            (beta, logp_t_NV.exp(), logp_t_NV - logm_NV),
            (1.0 - beta, logp_s_NV.exp(), logp_s_NV - logm_NV),
        ],
        options,
    )


def _sampled_reverse_kl_core(logp_s_NV: Tensor, logp_t_NV: Tensor, ids_N: Tensor) -> Tensor:
    ids_N1 = ids_N.unsqueeze(-1)
    logp_s_N = logp_s_NV.gather(-1, ids_N1).squeeze(-1)
    logp_t_N = logp_t_NV.detach().gather(-1, ids_N1).squeeze(-1)
    advantage_N = (logp_t_N - logp_s_N).detach()
    return -advantage_N * logp_s_N


def _prepare(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None,
    *,
    use_top_k: bool,
) -> tuple[Tensor, Tensor, DivergenceOptions]:
    """Validate, upcast, detach the teacher and (optionally) restrict to top-k.

    Returns the student and teacher *log-probabilities* over the (possibly
    restricted and renormalized) support, plus the resolved options.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, DivergenceOptions):
        raise ValueError(f"options must be a DivergenceOptions or None, got {type(options).__name__}")
    _check_logits(student_logits, teacher_logits, sampled_ids)
    s_NV = _upcast(student_logits)
    t_NV = _upcast(teacher_logits.detach())
    if use_top_k and options.top_k is not None and options.top_k < s_NV.shape[-1]:
        support_NK = t_NV.topk(options.top_k, dim=-1).indices
        s_NV = s_NV.gather(-1, support_NK)
        t_NV = t_NV.gather(-1, support_NK)
    return F.log_softmax(s_NV, dim=-1), F.log_softmax(t_NV, dim=-1), options


def _rowdot(a_NV: Tensor, b_NV: Tensor) -> Tensor:
    """``sum_v a * b`` per row without materializing the ``[N, V]`` product."""
    return torch.einsum("nv,nv->n", a_NV, b_NV)


def _reduce(terms: list[tuple[float, Tensor, Tensor]], options: DivergenceOptions) -> Tensor:
    """Sum over the vocabulary of the per-entry contribution ``sum_i coef_i * w_i * d_i``.

    Without clipping each term is a row-wise dot product (one fewer ``[N, V]``
    temporary); with clipping the per-entry contributions are formed, each
    clamped to at most ``tau``, then summed.
    """
    if options.clip_tau is None:
        out_N = None
        for coef, weight_NV, diff_NV in terms:
            part_N = _rowdot(weight_NV, diff_NV)
            part_N = part_N if coef == 1.0 else coef * part_N
            out_N = part_N if out_N is None else out_N + part_N
        return out_N
    contrib_NV = None
    for coef, weight_NV, diff_NV in terms:
        part_NV = weight_NV * diff_NV
        part_NV = part_NV if coef == 1.0 else coef * part_NV
        contrib_NV = part_NV if contrib_NV is None else contrib_NV + part_NV
    return contrib_NV.clamp(max=options.clip_tau).sum(dim=-1)


# --------------------------------------------------------------------------- #
# Per-token divergences: fn(student_logits_NV, teacher_logits_NV, ids_N, options) -> loss_N
# --------------------------------------------------------------------------- #


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """Reverse KL ``KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)`` per token.

    Mode-seeking: the student is pushed to put mass only where the teacher
    does. This is the OPSD default. Its exact gradient w.r.t. the student
    logits is ``p_S * (log p_S - log p_T - KL)``. ``sampled_ids`` is unused
    (kept for the common signature). Honors ``clip_tau`` and ``top_k``.
    """
    logp_s_NV, logp_t_NV, options = _prepare(
        student_logits, teacher_logits, sampled_ids, options, use_top_k=True
    )
    return _reverse_kl_core(logp_s_NV, logp_t_NV, options)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """Forward KL ``KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)`` per token.

    Mass-covering: the student is pushed to cover everything the teacher
    deems likely (the distillation cross-entropy up to the teacher entropy).
    ``sampled_ids`` is unused. Honors ``clip_tau`` and ``top_k``.
    """
    logp_s_NV, logp_t_NV, options = _prepare(
        student_logits, teacher_logits, sampled_ids, options, use_top_k=True
    )
    return _forward_kl_core(logp_s_NV, logp_t_NV, options)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence with weight ``options.beta``.

    ``M = beta * p_T + (1 - beta) * p_S`` and
    ``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``.
    ``beta = 0.5`` gives the symmetric JSD (bounded by ``ln 2``). ``log M`` is
    computed stably as ``logaddexp(log beta + log p_T, log(1 - beta) + log p_S)``
    so tiny probabilities never go through ``log(0)``. At ``beta`` equal to 0
    or 1 this definition is identically zero, hence
    :class:`DivergenceOptions` requires ``0 < beta < 1``. ``sampled_ids`` is
    unused. Honors ``clip_tau`` (on the per-entry sum of both weighted terms)
    and ``top_k``.
    """
    logp_s_NV, logp_t_NV, options = _prepare(
        student_logits, teacher_logits, sampled_ids, options, use_top_k=True
    )
    return _jsd_core(logp_s_NV, logp_t_NV, options)


def sampled_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """One-sample (REINFORCE-style) surrogate for the reverse-KL gradient.

    Uses only the sampled token ``y`` (drawn from the student, since the
    response is on-policy): with the detached per-token advantage
    ``a = log p_T(y) - log p_S(y)`` the surrogate is ``-a * log p_S(y)``.
    Its gradient ``-a * grad log p_S(y)`` is, in expectation over
    ``y ~ p_S``, exactly the reverse-KL gradient
    ``p_S * (log p_S - log p_T - KL)`` (since ``E[grad log p_S] = 0``).

    The returned *value* is a surrogate, not a KL estimate; log
    :func:`sampled_kl_estimate` for that. The method itself needs only the
    log-softmax at one token per position, but this common-signature function
    receives (and normalizes) the full ``[N, V]`` logits, so it saves no memory
    here. ``clip_tau`` and ``top_k`` do not apply (there is no vocabulary sum)
    and are ignored.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    _check_logits(student_logits, teacher_logits, sampled_ids)
    logp_s_NV = F.log_softmax(_upcast(student_logits), dim=-1)
    with torch.no_grad():
        logp_t_NV = F.log_softmax(_upcast(teacher_logits.detach()), dim=-1)
    return _sampled_reverse_kl_core(logp_s_NV, logp_t_NV, sampled_ids)


def sampled_kl_estimate(
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """Detached one-sample estimate ``log p_S(y) - log p_T(y)`` of reverse KL.

    Unbiased for ``KL(p_S || p_T)`` when ``y ~ p_S``; meant for logging next
    to :func:`sampled_reverse_kl`, whose value is only a gradient surrogate.
    ``options`` is accepted for the common signature and ignored.
    """
    _check_logits(student_logits, teacher_logits, sampled_ids)
    with torch.no_grad():
        ids_N1 = sampled_ids.unsqueeze(-1)
        logp_s_N = F.log_softmax(_upcast(student_logits.detach()), dim=-1).gather(-1, ids_N1)
        logp_t_N = F.log_softmax(_upcast(teacher_logits.detach()), dim=-1).gather(-1, ids_N1)
        return (logp_s_N - logp_t_N).squeeze(-1)


DivergenceFn = Callable[[Tensor, Tensor, Tensor, DivergenceOptions], Tensor]

DIVERGENCES: dict[str, DivergenceFn] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": jsd,
    "sampled_reverse_kl": sampled_reverse_kl,
}


# The divergences defined by per-entry terms over a support, each by its core on log-probabilities.
_CORES = {reverse_kl: _reverse_kl_core, forward_kl: _forward_kl_core, jsd: _jsd_core}


def _lookup(name: str) -> DivergenceFn:
    try:
        return DIVERGENCES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown divergence {name!r}; valid names: {', '.join(sorted(DIVERGENCES))}"
        ) from None


def per_token_divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    sampled_ids: Tensor,
    options: DivergenceOptions | None = None,
) -> Tensor:
    """Dispatch to ``DIVERGENCES[name]``; returns the per-token loss ``[N]``.

    Raises ValueError listing the valid names when ``name`` is unknown.
    """
    fn = _lookup(name)
    options = _DEFAULT_OPTIONS if options is None else options
    return fn(student_logits, teacher_logits, sampled_ids, options)


def token_entropy(logits_NV: Tensor) -> Tensor:
    """Entropy ``-sum_v p log p`` of ``softmax(logits)`` per row, in >= float32."""
    logp_NV = F.log_softmax(_upcast(logits_NV), dim=-1)
    return -_rowdot(logp_NV.exp(), logp_NV)
