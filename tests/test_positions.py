"""Per-token loss weights by position (`loss.positions`): hand-computed weights of each weighting on small tensors."""

import pytest
import torch

from opsdlab.config.stages import OPSDStageConfig
from opsdlab.loss.positions import supervised, token_weights, trailing_mean

# Three rollouts of 5, 2 and 1 response tokens (right-padded).
RESPONSE = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])


def weights(margin=None, **settings):
    return token_weights(RESPONSE, OPSDStageConfig(max_completion_length=6, **settings), margin)


def test_supervised_tokens_keep_the_first_n_response_tokens():
    assert supervised(RESPONSE, None).tolist() == RESPONSE.float().tolist()
    assert supervised(RESPONSE, 3).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert weights(supervised_tokens=3).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert weights().tolist() == RESPONSE.float().tolist()  # none: every response token, weight 1


def test_linear_falls_from_one_to_the_floor_at_each_rollouts_last_supervised_token():
    # w_j = 1 - (1 - floor) j / (L - 1): L = 5 -> steps of 0.9 / 4 = 0.225; L = 2 -> 1, floor; L = 1 -> 1.
    expected = [[1.0, 0.775, 0.55, 0.325, 0.1], [1.0, 0.1, 0, 0, 0], [1.0, 0, 0, 0, 0]]
    assert weights(position_weighting="linear", position_floor=0.1) == pytest.approx(torch.tensor(expected))
    # With supervised_tokens the decay spans the supervised tokens: L = min(length, 3).
    expected = [[1.0, 0.5, 0.0, 0, 0], [1.0, 0.0, 0, 0, 0], [1.0, 0, 0, 0, 0]]
    assert weights(position_weighting="linear", supervised_tokens=3) == pytest.approx(torch.tensor(expected))


def test_margin_cut_stops_at_the_first_smoothed_margin_below_the_threshold():
    margin = torch.tensor([[0.5, 0.2, -0.1, 0.3, -2.0], [-1.0, -1.0, 0, 0, 0], [-1.0, 0, 0, 0, 0]])
    # Window 1: the first margin < 0 is token 2 of row 0, and token 0 of rows 1 and 2: weight 0 from there on.
    assert weights(margin, position_weighting="margin_cut", margin_window=1).tolist() == [
        [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    # Window 2: trailing means 0.35, 0.05, 0.1, -0.85 (from token 1 on); row 1: -1.0 at token 1; row 2 is
    # shorter than the window and is never cut.
    assert weights(margin, position_weighting="margin_cut", margin_window=2).tolist() == [
        [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    # Threshold 0.1: 0.05 at token 2 cuts row 0 there.
    assert weights(margin, position_weighting="margin_cut", margin_window=2, margin_threshold=0.1).tolist() == [
        [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    # Past supervised_tokens nothing is supervised, so a collapse there changes nothing.
    assert weights(margin, position_weighting="margin_cut", margin_window=2, supervised_tokens=4).tolist() == [
        [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_the_trailing_mean_is_defined_only_over_a_whole_supervised_window():
    margin = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mean, defined = trailing_mean(margin, torch.tensor([[1.0, 1.0, 0.0, 1.0]]), 2)
    assert mean[0, :2].tolist() == [0.5, 1.5] and defined.tolist() == [[False, True, False, False]]


def test_margin_cut_needs_the_margins():
    with pytest.raises(ValueError, match="margin_cut needs"):
        weights(position_weighting="margin_cut", margin_window=1)
