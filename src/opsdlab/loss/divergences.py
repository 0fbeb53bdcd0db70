"""Per-token divergences for on-policy self-distillation (OPSD).

In OPSD one network plays two roles on the *same* sampled response ``y``:

* the **student** reads only the problem ``x`` and gives ``p_S(. | x, y_<t)``;
* the **teacher** additionally reads a reference solution ``c`` and gives
  ``p_T(. | x, c, y_<t)``.

The training signal is a divergence between the two next-token distributions at
every kept response position. Gradients flow through the student only: the
teacher is a fixed target, so every function here detaches the teacher logits
itself instead of trusting the caller to do it.

This module is pure torch (no model, no I/O) and has three layers:

1. Per-token divergence functions with the common signature
   ``fn(student_logits_NV, teacher_logits_NV, sampled_ids_N, options) -> loss_N``,
   registered in :data:`DIVERGENCES` and dispatched by
   :func:`per_token_divergence`.
2. :func:`chunked_divergence`, which goes from final hidden states to summed
   loss without ever materializing the ``(N, V)`` logits of all tokens at once:
   it processes row chunks and takes each chunk's gradient right after its loss
   (or, for a head whose parameters are not named, recomputes the chunk under
   activation checkpointing), so forward and backward hold one chunk's logits.
   At V = 151,936 the logits of 4,096 tokens are 2.5 GB per float32 copy, and a
   divergence needs several copies.
3. :func:`naive_divergence`, the same computation done in one shot; it is the
   reference for tests and the memory benchmark.

Precision: logits are upcast to at least float32 before any softmax (bfloat16 /
float16 / float32 inputs are computed in float32; float64 inputs stay float64,
which only matters for high-precision tests). Logits must be finite: a ``-inf``
logit makes ``0 * log 0`` terms NaN.

Tensor names carry their axes as a suffix: ``N`` kept response tokens, ``V``
vocabulary (or the top-k support), ``D`` hidden size, ``K`` top-k support.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opsdlab.config.divergence import DivergenceOptions

__all__ = [
    "DIVERGENCES",
    "DivergenceOptions",
    "SupportTarget",
    "chunked_divergence",
    "forward_kl",
    "jsd",
    "naive_divergence",
    "per_token_divergence",
    "reverse_kl",
    "sampled_kl_estimate",
    "sampled_reverse_kl",
    "token_entropy",
    "with_tail",
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


# --------------------------------------------------------------------------- #
# Targets on a per-token support with a tail bucket
# --------------------------------------------------------------------------- #

# The tail bucket's mass is at least 1 - exp(-1e-7) (about 1e-7), so its log stays finite when the
# support holds (numerically) all the mass; the OPSD authors' released code uses the same bound.
_TAIL_LOG_MASS_MAX = -1e-7


def with_tail(logp_NV: Tensor, support_NK: Tensor) -> Tensor:
    """``[N, K + 1]`` log-probabilities: those of the ``K`` support entries, then one tail bucket
    holding the rest of the mass, ``log(1 - sum_k p_k)``.

    ``logp_NV`` is a normalised log-distribution; gradients flow through the gathered entries and
    the tail alike (the tail's mass is floored at about 1e-7, where it passes no gradient).
    """
    gathered_NK = logp_NV.gather(-1, support_NK)
    log_mass_N1 = torch.logsumexp(gathered_NK, dim=-1, keepdim=True).clamp(max=_TAIL_LOG_MASS_MAX)
    return torch.cat([gathered_NK, torch.log(-torch.expm1(log_mass_N1))], dim=-1)


@dataclass(frozen=True)
class SupportTarget:
    """What a teacher head may return instead of logits: a target that lives on a per-token support.

    Each token's target distribution is over ``K`` vocabulary entries (``support_NK``) and one tail
    bucket holding the rest of the mass (``log_probs_NK1``, normalised over the ``K + 1``). The student
    is compared with it on the same ``K + 1`` entries (:func:`with_tail` of its log-probabilities) by
    the divergence's per-entry terms (``clip_tau`` clips each of them), and each token's loss is
    multiplied by ``weight_N``. ``teacher_log_probs_NV`` is the full-vocabulary distribution that the
    statistics report as the teacher's. All of it is detached and already at the sampling temperature
    (the divergence does not divide it again).
    """

    support_NK: Tensor
    log_probs_NK1: Tensor
    weight_N: Tensor
    teacher_log_probs_NV: Tensor

    def rows(self, index: Tensor) -> "SupportTarget":
        return SupportTarget(*(x.index_select(0, index) for x in (self.support_NK, self.log_probs_NK1,
                                                                   self.weight_N, self.teacher_log_probs_NV)))


def _support_loss(fn: DivergenceFn, logp_s_NV: Tensor, target: SupportTarget, options: DivergenceOptions) -> Tensor:
    """The per-token loss against a :class:`SupportTarget`: ``fn``'s terms on its support, times its weights."""
    core = _CORES.get(fn)
    if core is None:
        raise ValueError(f"a target on a support needs one of the divergences "
                         f"{sorted(name for name, f in DIVERGENCES.items() if f in _CORES)}")
    if options.top_k is not None:
        raise ValueError("a target on a support brings its own support; top_k must be None")
    return core(with_tail(logp_s_NV, target.support_NK), target.log_probs_NK1, options) * target.weight_N


def _from_log_probs(fn: DivergenceFn, logp_s_NV: Tensor, target: "Tensor | SupportTarget", ids_N: Tensor,
                    options: DivergenceOptions) -> Tensor:
    """``fn`` on full-vocabulary log-probabilities already computed (no second log-softmax), against
    the teacher's log-probabilities or a :class:`SupportTarget`."""
    if isinstance(target, SupportTarget):
        return _support_loss(fn, logp_s_NV, target, options)
    if fn is sampled_reverse_kl:
        return _sampled_reverse_kl_core(logp_s_NV, target, ids_N)
    core = _CORES.get(fn)
    if core is None:  # any other divergence: log-probabilities are valid logits
        return fn(logp_s_NV, target, ids_N, options)
    return core(*_top_k_support(logp_s_NV, target, options), options)


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


# --------------------------------------------------------------------------- #
# Hidden states -> loss, chunked and naive
# --------------------------------------------------------------------------- #

_STAT_KEYS = ("loss_N", "student_entropy_N", "teacher_entropy_N", "student_logp_N", "teacher_logp_N", "weight_N")

# One chunk's per-name row groups: (divergence fn, row indices within the chunk
# or None meaning "all rows").
_Groups = list[tuple[DivergenceFn, "Tensor | None"]]


def _resolve_names(names: str | list[str], n_tokens: int) -> list[tuple[DivergenceFn, list[int] | None]]:
    """Turn ``names`` into ``[(fn, global row indices or None for all rows)]``."""
    if isinstance(names, str):
        return [(_lookup(names), None)]
    names = list(names)
    if len(names) != n_tokens:
        raise ValueError(f"names has {len(names)} entries but there are {n_tokens} tokens")
    rows_by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows_by_name.setdefault(name, []).append(i)
    fns = [(_lookup(name), rows) for name, rows in rows_by_name.items()]
    if len(fns) == 1:
        return [(fns[0][0], None)]
    return fns


def _groups_for_range(
    resolved: list[tuple[DivergenceFn, list[int] | None]], start: int, end: int, device: torch.device
) -> _Groups:
    """Restrict the resolved name groups to rows ``[start, end)`` (chunk-local indices)."""
    groups: _Groups = []
    for fn, rows in resolved:
        if rows is None:
            groups.append((fn, None))
            continue
        local = [r - start for r in rows if start <= r < end]
        if local:
            groups.append((fn, torch.tensor(local, dtype=torch.long, device=device)))
    if len(groups) == 1 and groups[0][1] is not None and groups[0][1].numel() == end - start:
        groups = [(groups[0][0], None)]
    return groups


def _loss_and_stats(
    student_hidden_nD: Tensor,
    teacher_hidden_nD: Tensor,
    sampled_ids_n: Tensor,
    groups: _Groups,
    *,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    options: DivergenceOptions,
    temperature: float = 1.0,
) -> tuple[Tensor, ...]:
    """Logits, per-token losses and detached stats for one block of rows.

    Returns ``(loss_sum, loss_n, student_entropy_n, teacher_entropy_n,
    student_logp_n, teacher_logp_n, weight_n)``; only ``loss_sum`` carries grad. Each
    side's logits are normalized once (one log-softmax) for both the loss and
    the stats. The loss is computed first and the stats last, under
    ``no_grad``: with non-reentrant checkpointing (early stop) the backward
    recomputation then stops after the loss graph and never redoes the stats.
    The teacher head returns logits, or a :class:`SupportTarget` that is taken as it is.
    """
    s_nV = _upcast(student_head(student_hidden_nD))
    if temperature != 1.0:
        s_nV = s_nV / temperature
    logp_s_nV = F.log_softmax(s_nV, dim=-1)  # its backward keeps only its output, not the logits
    del s_nV
    with torch.no_grad():
        target = teacher_head(teacher_hidden_nD)
        if isinstance(target, SupportTarget):
            logp_t_nV, weight_n = target.teacher_log_probs_NV, target.weight_N
        else:
            t_nV = _upcast(target)
            if temperature != 1.0:
                t_nV = t_nV / temperature
            target = logp_t_nV = F.log_softmax(t_nV, dim=-1)
            weight_n = logp_s_nV.new_ones(logp_s_nV.shape[0])
            del t_nV

    if len(groups) == 1 and groups[0][1] is None:
        loss_n = _from_log_probs(groups[0][0], logp_s_nV, target, sampled_ids_n, options)
    else:
        loss_n = logp_s_nV.new_zeros(logp_s_nV.shape[0])
        for fn, rows in groups:
            part = _from_log_probs(
                fn,
                logp_s_nV.index_select(0, rows),
                target.rows(rows) if isinstance(target, SupportTarget) else target.index_select(0, rows),
                sampled_ids_n.index_select(0, rows),
                options,
            )
            loss_n = loss_n.index_copy(0, rows, part)
    loss_sum = loss_n.sum()

    with torch.no_grad():
        ids_n1 = sampled_ids_n.unsqueeze(-1)
        teacher_logp_n = logp_t_nV.gather(-1, ids_n1).squeeze(-1)
        teacher_entropy_n = -_rowdot(logp_t_nV.exp(), logp_t_nV)
        del logp_t_nV, target
        logp_s_nV = logp_s_nV.detach()
        student_logp_n = logp_s_nV.gather(-1, ids_n1).squeeze(-1)
        student_entropy_n = -_rowdot(logp_s_nV.exp(), logp_s_nV)
    return (loss_sum, loss_n.detach(), student_entropy_n, teacher_entropy_n, student_logp_n, teacher_logp_n,
            weight_n.detach())


def _check_hidden(
    student_hidden_ND: Tensor, teacher_hidden_ND: Tensor, sampled_ids_N: Tensor
) -> int:
    if student_hidden_ND.dim() != 2 or teacher_hidden_ND.dim() != 2:
        raise ValueError(
            "hidden states must be [N, D]; got student "
            f"{tuple(student_hidden_ND.shape)} and teacher {tuple(teacher_hidden_ND.shape)}"
        )
    n_tokens = student_hidden_ND.shape[0]
    if teacher_hidden_ND.shape[0] != n_tokens:
        raise ValueError(
            f"student has {n_tokens} tokens but teacher has {teacher_hidden_ND.shape[0]}"
        )
    if sampled_ids_N.shape != (n_tokens,):
        raise ValueError(f"sampled_ids_N must be [{n_tokens}], got {tuple(sampled_ids_N.shape)}")
    if sampled_ids_N.dtype != torch.long:
        raise ValueError(f"sampled_ids_N must be torch.long, got {sampled_ids_N.dtype}")
    return n_tokens


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _empty_result(student_hidden_ND: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    dtype = torch.promote_types(student_hidden_ND.dtype, torch.float32)
    zero = (student_hidden_ND.sum() * 0).to(dtype)  # keeps the graph so backward() works
    empty = student_hidden_ND.new_zeros(0, dtype=dtype)
    return zero, {k: empty for k in _STAT_KEYS}


class _GradientInForward(torch.autograd.Function):
    """The summed loss of all chunks, its gradient computed chunk by chunk during the forward.

    `run(hidden_ND, params)` returns ``(loss_sum, grad_hidden_ND, grad_params)``: the gradient of the
    loss with respect to the student's hidden states and the head's parameters. The backward only
    scales them by the incoming gradient, so no chunk's logits are computed a second time.
    """

    @staticmethod
    def forward(ctx, run, student_hidden_ND, *params):
        loss_sum, grad_hidden, grad_params = run(student_hidden_ND, params)
        ctx.grads = (grad_hidden, grad_params)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_params = ctx.grads
        del ctx.grads
        scale = grad_loss.float()
        return (None, (grad_hidden * scale).to(grad_hidden.dtype),
                *(None if g is None else (g * scale).to(g.dtype) for g in grad_params))


def chunked_divergence(
    student_hidden_ND: Tensor,
    teacher_hidden_ND: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    sampled_ids_N: Tensor,
    names: str | list[str],
    options: DivergenceOptions | None = None,
    chunk_size: int = 256,
    temperature: float = 1.0,
    head_params: Sequence[Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed per-token divergence from hidden states, one row chunk at a time.

    Args:
        student_hidden_ND: Final hidden states of the student at the ``N`` kept
            response positions (already selected and flattened); carries grad.
        teacher_hidden_ND: Teacher hidden states at the same positions; it is
            detached here, so no gradient reaches the teacher pass.
        student_head / teacher_head: Map hidden states to logits (e.g. the
            shared ``model.lm_head``). The teacher head runs under
            ``no_grad``, so a shared head's weights get gradient only through
            the student logits. It may return a :class:`SupportTarget`
            instead of logits: the loss is then taken on its support and
            weighted per token.
        sampled_ids_N: The response token at each position (``torch.long``).
        names: One divergence name for all tokens, or a list of ``N`` names
            (a "split" arm can use reverse KL on some rows and forward KL on
            others).
        options: :class:`DivergenceOptions` (defaults if None).
        chunk_size: Rows per chunk; the last chunk may be shorter. The
            default 256 keeps peak memory at ~1/14 of the one-shot version
            for 4,096 tokens at V = 151,936 (see
            ``benchmarks/opsd_loss_memory.py``); 512 already misses 1/8.
        temperature: Both sides' logits are divided by it (in float32) before
            any softmax: the distributions compared are those the response
            was sampled from at this temperature, as TRL's log-probabilities.
            The stats are of the same tempered distributions.
        head_params: The trainable tensors ``student_head`` reads (the LM
            head's weight; ``[]`` for a frozen head). Given, and with
            gradients on, each chunk's gradient with respect to the hidden
            rows and these tensors is computed in the forward, right after
            its loss, and the backward only scales it: the head's product
            runs four times per chunk (student logits, teacher logits, the
            two gradient products) instead of six (checkpointing recomputes
            both sides' logits). The price is memory held from forward to
            backward: one ``[N, D]`` gradient and each tensor's gradient (the
            head weight's size, in its dtype, summed over chunks as autograd
            would sum them into ``.grad``). None: activation checkpointing,
            as below, for a head whose parameters cannot be named (nothing
            extra is held between forward and backward).

    Returns:
        ``(loss_sum, stats)``: the *sum* of per-token losses as a float32
        scalar with grad (the caller divides by its own, possibly global,
        token count), and detached ``[N]`` tensors ``loss_N``,
        ``student_entropy_N``, ``teacher_entropy_N``, ``student_logp_N`` and
        ``teacher_logp_N`` (full-vocabulary quantities, independent of
        ``top_k``), and ``weight_N``, each token's loss weight (1 unless
        a :class:`SupportTarget` sets it).

    Memory, without ``head_params``: each chunk runs under ``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``. The forward keeps only the chunk's inputs (hidden
    rows, ids) and the backward recomputes one chunk's logits at a time
    (autograd finishes a chunk's subgraph before starting the next), so peak
    extra memory is ``O(chunk_size * V)`` instead of ``O(N * V)``. The price
    is a second forward of the head and divergence per chunk.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, DivergenceOptions):
        raise ValueError(f"options must be a DivergenceOptions or None, got {type(options).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_temperature(temperature)
    n_tokens = _check_hidden(student_hidden_ND, teacher_hidden_ND, sampled_ids_N)
    resolved = _resolve_names(names, n_tokens)
    if n_tokens == 0:
        return _empty_result(student_hidden_ND)
    teacher_hidden_ND = teacher_hidden_ND.detach()
    block = functools.partial(
        _loss_and_stats, student_head=student_head, teacher_head=teacher_head, options=options,
        temperature=float(temperature),
    )

    if head_params is not None and torch.is_grad_enabled() and student_hidden_ND.requires_grad:
        return _chunked_gradient_in_forward(block, student_hidden_ND, teacher_hidden_ND, sampled_ids_N,
                                            resolved, chunk_size, list(head_params))
    loss_sums: list[Tensor] = []
    stat_parts: list[tuple[Tensor, ...]] = []
    for start, end, groups in _chunks(resolved, n_tokens, chunk_size, sampled_ids_N.device):
        loss_sum, *stats = checkpoint(
            block,
            student_hidden_ND[start:end],
            teacher_hidden_ND[start:end],
            sampled_ids_N[start:end],
            groups,
            use_reentrant=False,
        )
        loss_sums.append(loss_sum)
        stat_parts.append(tuple(stats))
    return _summed(loss_sums), _stats_by_key(stat_parts)


def _chunks(resolved, n_tokens: int, chunk_size: int, device: torch.device):
    """``(start, end, name groups)`` of each row chunk, in order."""
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        yield start, end, _groups_for_range(resolved, start, end, device)


def _summed(loss_sums: list[Tensor]) -> Tensor:
    return loss_sums[0] if len(loss_sums) == 1 else torch.stack(loss_sums).sum()


def _stats_by_key(stat_parts: list[tuple[Tensor, ...]]) -> dict[str, Tensor]:
    """The chunks' detached per-token stats, concatenated per key of `_STAT_KEYS`."""
    return {key: torch.cat([p[i] for p in stat_parts]) for i, key in enumerate(_STAT_KEYS)}


def _chunked_gradient_in_forward(block, student_hidden_ND: Tensor, teacher_hidden_ND: Tensor, sampled_ids_N: Tensor,
                                 resolved, chunk_size: int, head_params: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """`chunked_divergence` with each chunk's gradient taken in the forward (`_GradientInForward`)."""
    n_tokens = student_hidden_ND.shape[0]
    stat_parts: list[tuple[Tensor, ...]] = []

    def run(hidden_ND: Tensor, params: tuple[Tensor, ...]):
        grad_hidden = torch.empty_like(hidden_ND)
        grad_params: list[Tensor | None] = [None] * len(params)
        loss_sums = []
        for start, end, groups in _chunks(resolved, n_tokens, chunk_size, sampled_ids_N.device):
            with torch.enable_grad():
                rows = hidden_ND[start:end].detach().requires_grad_(True)
                # The head reads a view, not the leaf: a module hook that waits for all its inputs'
                # gradients (`register_multi_grad_hook`, e.g. FlopCounterMode's module tracker) cannot
                # be given a leaf inside `autograd.grad`.
                loss_sum, *stats = block(rows.view_as(rows), teacher_hidden_ND[start:end], sampled_ids_N[start:end],
                                         groups)
                grads = torch.autograd.grad(loss_sum, (rows, *params), allow_unused=True)
            grad_hidden[start:end] = 0.0 if grads[0] is None else grads[0]
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            loss_sums.append(loss_sum.detach())
            stat_parts.append(tuple(stats))
        return _summed(loss_sums), grad_hidden, grad_params

    total = _GradientInForward.apply(run, student_hidden_ND, *head_params)
    return total, _stats_by_key(stat_parts)


def naive_divergence(
    student_hidden_ND: Tensor,
    teacher_hidden_ND: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    sampled_ids_N: Tensor,
    names: str | list[str],
    options: DivergenceOptions | None = None,
    chunk_size: int = 256,
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Same contract as :func:`chunked_divergence`, computed in one shot.

    Materializes the full ``[N, V]`` student and teacher logits and keeps the
    autograd intermediates of all tokens alive until backward. It is the
    reference for tests and the memory benchmark, not for training at large
    ``N * V``. ``chunk_size`` is accepted for signature compatibility and
    ignored.
    """
    options = _DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, DivergenceOptions):
        raise ValueError(f"options must be a DivergenceOptions or None, got {type(options).__name__}")
    _check_temperature(temperature)
    n_tokens = _check_hidden(student_hidden_ND, teacher_hidden_ND, sampled_ids_N)
    resolved = _resolve_names(names, n_tokens)
    if n_tokens == 0:
        return _empty_result(student_hidden_ND)
    groups = _groups_for_range(resolved, 0, n_tokens, sampled_ids_N.device)
    total, *stats = _loss_and_stats(
        student_hidden_ND,
        teacher_hidden_ND.detach(),
        sampled_ids_N,
        groups,
        student_head=student_head,
        teacher_head=teacher_head,
        options=options,
        temperature=float(temperature),
    )
    return total, dict(zip(_STAT_KEYS, stats))
