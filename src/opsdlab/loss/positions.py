"""Which response tokens carry the OPSD loss, and with what weight: one number per token, by its position.

Two settings decide a token's weight (`OPSDStageConfig`):

- `supervised_tokens` N: only response tokens 0..N-1 of each rollout carry the loss (null: all). Training
  on the first ~100 rollout tokens matched or beat full rollouts in ESR (arXiv 2605.27028), and a teacher
  token's position predicts whether it helps (arXiv 2605.21606).
- `position_weighting` (`POSITION_WEIGHTINGS`), the weight of each supervised token:
  `none`: 1. `linear`: 1 at response token 0, falling linearly to `position_floor` at the rollout's last
  supervised token L-1 (L: its supervised tokens, min(length, N)): w_j = 1 - (1 - floor) j / (L - 1); a
  rollout with one supervised token has weight 1. The decay spans the supervised tokens, not the whole
  rollout, so that with N set it shapes the tokens trained on (with N null the two are the same).
  `margin_cut`: 1 up to the first position where the teacher's margin over the student collapses, 0 from
  there on ("Prefix Teach, Suffix Fade", arXiv 2605.13643). The margin of token j is
  m_j = log p_T(y_j) - log p_S(y_j), the teacher's minus the student's log-probability of the sampled
  token at the sampling temperature: positive where the privileged teacher backs the rollout more than the
  student does. Its trailing mean over W = `margin_window` tokens, s_j = mean(m_{j-W+1..j}), is taken
  where all W tokens are supervised (j >= W-1); the cut c is the first such j with s_j <
  `margin_threshold`, and tokens c, c+1, ... get weight 0 (no cut: every supervised token has weight 1).
  The paper measures the teacher's margin over the student's top-K candidates, per sentence, and cuts at a
  BIC change point; this is a cheaper stand-in on the sampled token with a threshold.

The weights multiply each token's loss, and the loss of an optimizer step is sum(w x loss) / sum(w) over
its tokens (`stages.opsd.loss_normalizer`): a mean over weighted tokens, whatever the split into
micro-batches and processes. Tokens of weight 0 are not scored at all.

Tensors are ``[B, C]``: B rollouts, C response columns (right-padded); a mask is 1.0 on a token and 0.0
elsewhere. Every function here is pure (no model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def supervised(response_BC: Tensor, supervised_tokens: int | None) -> Tensor:
    """The response mask (float) restricted to columns below `supervised_tokens` (None: every column)."""
    mask = response_BC.float()
    if supervised_tokens is None:
        return mask
    columns = torch.arange(mask.shape[1], device=mask.device)
    return mask * (columns < supervised_tokens)


def _none(supervised_BC: Tensor, margin_BC: Tensor | None, settings) -> Tensor:
    return supervised_BC


def _linear(supervised_BC: Tensor, margin_BC: Tensor | None, settings) -> Tensor:
    columns = torch.arange(supervised_BC.shape[1], device=supervised_BC.device, dtype=supervised_BC.dtype)
    last_B1 = (supervised_BC * columns).amax(dim=1, keepdim=True)  # the last supervised column, 0 if none
    fraction = columns / last_B1.clamp(min=1)
    return (1 - (1 - settings.position_floor) * fraction) * supervised_BC


def trailing_mean(margin_BC: Tensor, supervised_BC: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The mean of the margin over the `window` columns ending at each column, and where it is defined
    (every one of those columns supervised)."""
    pad = margin_BC.new_zeros(margin_BC.shape[0], 1)
    sums = torch.cat([pad, (margin_BC * supervised_BC).cumsum(dim=1)], dim=1)
    counts = torch.cat([pad, supervised_BC.cumsum(dim=1)], dim=1)
    columns = torch.arange(margin_BC.shape[1], device=margin_BC.device)
    start = (columns - window + 1).clamp(min=0)
    mean = (sums[:, columns + 1] - sums[:, start]) / window
    defined = (counts[:, columns + 1] - counts[:, start]) == window
    return mean, defined


def _margin_cut(supervised_BC: Tensor, margin_BC: Tensor | None, settings) -> Tensor:
    if margin_BC is None:
        raise ValueError("position_weighting margin_cut needs the teacher-minus-student margin of every token")
    mean, defined = trailing_mean(margin_BC.to(supervised_BC.dtype), supervised_BC, settings.margin_window)
    collapsed = defined & (mean < settings.margin_threshold)
    after_cut = collapsed.cumsum(dim=1) > 0
    return supervised_BC * ~after_cut


@dataclass(frozen=True)
class PositionWeighting:
    """`weights(supervised_BC, margin_BC or None, settings) -> weight_BC`; `reads_margin`: it needs each
    token's teacher-minus-student margin, which takes a scoring pass over the rollouts before the loss."""

    weights: Callable[[Tensor, Tensor | None, object], Tensor]
    reads_margin: bool = False


POSITION_WEIGHTINGS: dict[str, PositionWeighting] = {
    "none": PositionWeighting(_none),
    "linear": PositionWeighting(_linear),
    "margin_cut": PositionWeighting(_margin_cut, reads_margin=True),
}


def token_weights(response_BC: Tensor, settings, margin_BC: Tensor | None = None) -> Tensor:
    """Each response token's loss weight (float, 0 off the response and past `supervised_tokens`).

    `settings` has `supervised_tokens`, `position_weighting`, `position_floor`, `margin_threshold` and
    `margin_window` (an `OPSDStageConfig`).
    """
    if settings.position_weighting not in POSITION_WEIGHTINGS:
        raise ValueError(f"unknown position weighting {settings.position_weighting!r}; choose one of "
                         f"{sorted(POSITION_WEIGHTINGS)}")
    weighting = POSITION_WEIGHTINGS[settings.position_weighting]
    return weighting.weights(supervised(response_BC, settings.supervised_tokens), margin_BC, settings)
