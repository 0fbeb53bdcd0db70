import pytest

from opsdlab.loss.gates import GATES, route

CORRECT = [True, True, False, False]
TRUNCATED = [False, True, False, True]  # the second rollout is "correct" text but hit the length cap


def test_correct_gate_keeps_only_untruncated_correct_rollouts():
    assert route("correct", CORRECT, TRUNCATED, "reverse_kl") == ["reverse_kl", None, None, None]


def test_incorrect_gate_keeps_the_complement_including_truncated():
    assert route("incorrect", CORRECT, TRUNCATED, "forward_kl") == [None, "forward_kl", "forward_kl", "forward_kl"]


def test_all_and_correct_or_truncated():
    assert route("all", CORRECT, TRUNCATED, "jsd") == ["jsd"] * 4
    assert route("correct_or_truncated", CORRECT, TRUNCATED, "jsd") == ["jsd", "jsd", None, "jsd"]


def test_split_uses_reverse_kl_on_correct_and_forward_kl_on_the_rest():
    assert route("split", CORRECT, TRUNCATED, "jsd") == ["reverse_kl", "forward_kl", "forward_kl", "forward_kl"]


def test_empty_batch_and_all_dropped_are_not_errors():
    assert route("correct", [], [], "reverse_kl") == []
    assert route("correct", [False, False], [False, False], "reverse_kl") == [None, None]


def test_gate_names_and_bad_input():
    assert set(GATES) == {"all", "correct", "incorrect", "correct_or_truncated", "split"}
    with pytest.raises(ValueError, match="unknown gate"):
        route("wrong_only", CORRECT, TRUNCATED, "reverse_kl")
    with pytest.raises(ValueError, match="truncation flags"):
        route("all", [True], [], "reverse_kl")
