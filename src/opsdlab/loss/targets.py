"""What a divergence is taken against: the teacher's log-probabilities, or a target on a per-token support.

A teacher head given to :func:`opsdlab.loss.chunked.chunked_divergence` returns logits or, instead, a
:class:`SupportTarget`: each token's target distribution over ``K`` vocabulary entries and one tail
bucket holding the rest of the mass, with a per-token loss weight (the ``rlcsd_plugin`` teacher of
:mod:`opsdlab.loss.contrastive` builds one). The student is read on the same ``K + 1`` entries
(:func:`with_tail`) and compared by the divergence's per-entry terms (``divergences._CORES``).
``_from_log_probs`` takes a divergence on log-probabilities already computed, against either kind of
target, so a chunk normalizes each side once for both its loss and its statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opsdlab.loss.divergences import (
    _CORES,
    DIVERGENCES,
    DivergenceFn,
    DivergenceOptions,
    _sampled_reverse_kl_core,
    _top_k_support,
    sampled_reverse_kl,
)

__all__ = ["SupportTarget", "with_tail"]


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
