"""The knobs of the OPSD divergences (`loss.divergences`), checked when an OPSD config is built."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DivergenceOptions:
    """Knobs shared by all divergences; validated on construction.

    Attributes:
        beta: Mixture weight of the generalized Jensen-Shannon divergence
            (``"jsd"`` only). ``M = beta * p_T + (1 - beta) * p_S`` and
            ``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``.
            ``beta = 0.5`` is the symmetric JSD. At ``beta = 0`` or ``1`` the
            mixture equals one of the two distributions and the weighted sum
            is identically zero (no training signal), so the open interval
            ``0 < beta < 1`` is required.
        clip_tau: Point-wise clipping, as in the original OPSD recipe
            (``tau = 0.05`` there). A full-vocabulary divergence is a sum of
            per-entry contributions ``c_v`` (e.g. ``p_S,v (log p_S,v - log
            p_T,v)`` for reverse KL); with clipping each one becomes
            ``min(c_v, tau)`` before summing. Consequences: (a) an entry whose
            contribution exceeds ``tau`` contributes exactly ``tau`` and
            **passes no gradient** (the clamp's derivative there is 0), so a
            few badly mismatched tokens cannot dominate the update, while
            entries at or below ``tau`` keep their full gradient; (b) negative
            contributions are untouched, so a clipped per-token value is no
            longer a divergence and can be negative. Must be ``> 0``. Ignored
            by ``"sampled_reverse_kl"``, which has no vocabulary sum.
        top_k: Restrict the divergence to the teacher's ``k`` most probable
            tokens. Both distributions are renormalized over that support
            (a log-softmax of the gathered logits), i.e. the loss compares
            ``p_S(. | v in S_k)`` with ``p_T(. | v in S_k)``. Student mass
            outside the support is neither penalized nor receives gradient;
            the student logits receive gradient only at the support entries.
            ``k >= V`` means the full vocabulary. Must be ``>= 1``. Ignored by
            ``"sampled_reverse_kl"``.
    """

    beta: float = 0.5
    clip_tau: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(f"DivergenceOptions.beta must be a float, got {self.beta!r}")
        if not (0.0 < float(self.beta) < 1.0):
            raise ValueError(
                f"DivergenceOptions.beta must satisfy 0 < beta < 1, got {self.beta!r}; "
                "at beta = 0 or 1 the generalized JSD is identically zero"
            )
        if self.clip_tau is not None:
            if isinstance(self.clip_tau, bool) or not isinstance(self.clip_tau, (int, float)):
                raise ValueError(
                    f"DivergenceOptions.clip_tau must be a float or None, got {self.clip_tau!r}"
                )
            if not (math.isfinite(self.clip_tau) and self.clip_tau > 0):
                raise ValueError(
                    f"DivergenceOptions.clip_tau must be a finite number > 0 or None, "
                    f"got {self.clip_tau!r}"
                )
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise ValueError(
                    f"DivergenceOptions.top_k must be an int or None, got {self.top_k!r}"
                )
            if self.top_k < 1:
                raise ValueError(f"DivergenceOptions.top_k must be >= 1 or None, got {self.top_k}")
