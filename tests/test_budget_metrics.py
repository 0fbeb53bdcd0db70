"""Efficient-reasoning metrics: accuracy within token budgets and tokens spent after the first correct answer.

Hand-computed values on tiny inputs for the pure functions in `opsdlab.evaluation.metrics.efficiency`,
the token index that `evaluate` records for each correct sample (`evaluate.answer_token`), and
`evaluate` itself on scripted responses through both backends' code paths and on the tiny model.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from opsdlab.evaluation import vllm_backend
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import _first_true, answer_token, evaluate, read_samples, write_eval
from opsdlab.evaluation.metrics.efficiency import (accuracy_at_budget, budget_ladder, find_answer,
                                                   tokens_after_first_correct)
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.tasks.verifier import VerifierConfig


def S(pid, idx, correct, resp, trunc=False, first=None):
    return Sample(pid, idx, correct, None, resp, 0, trunc, "", first)


# ------------------------------------------------------------------ budgets


def test_budget_ladder_hand_values():
    # sorted 10, 25, 30, 40 -> p25 21.25, p50 27.5, p75 32.5 (halves round up), p90 37.0, max 40
    assert budget_ladder([40, 10, 30, 25]) == [21, 28, 33, 37, 40]
    assert budget_ladder([7, 7, 7]) == [7]  # deduplicated
    assert budget_ladder([5]) == [5]
    with pytest.raises(ValueError, match="at least one"):
        budget_ladder([])


@pytest.fixture
def two_by_two():
    # p1: correct at 10 and 30 tokens; p2: correct at 25, and correct but truncated at 40
    return [S("p1", 0, True, 10), S("p1", 1, True, 30), S("p2", 0, True, 25), S("p2", 1, True, 40, trunc=True)]


def test_accuracy_at_budget_default_ladder(two_by_two):
    # ladder of 10, 25, 30, 40 is [21, 28, 33, 37, 40]
    # 21: p1 1/2, p2 0 -> .25; 28: p1 1/2, p2 1/2 -> .5; 33 and up: p1 1, p2 1/2 (truncated never counts) -> .75
    assert accuracy_at_budget(two_by_two) == {"21": 0.25, "28": 0.5, "33": 0.75, "37": 0.75, "40": 0.75}


def test_accuracy_at_budget_given_budgets_sorted_deduplicated_string_keys(two_by_two):
    result = accuracy_at_budget(two_by_two, [30, 9, 10, 30])
    # 9: nothing; 10: p1 1/2 -> .25; 30: p1 1, p2 1/2 -> .75 (a length equal to the budget fits)
    assert result == {"9": 0.0, "10": 0.25, "30": 0.75}
    assert list(result) == ["9", "10", "30"]
    assert json.loads(json.dumps(result)) == result


def test_accuracy_at_budget_is_a_mean_over_problems():
    # p1 has 1 of 2 correct within 5; p2 0 of 2: (1/2 + 0) / 2, the avg@k form
    samples = [S("p1", 0, True, 5), S("p1", 1, False, 5), S("p2", 0, False, 5), S("p2", 1, True, 50)]
    assert accuracy_at_budget(samples, [5]) == {"5": 0.25}


@pytest.mark.parametrize("budgets", [[], [-1], [2.5], [True], ["64"]])
def test_accuracy_at_budget_rejects_bad_budgets(two_by_two, budgets):
    with pytest.raises(ValueError, match="budgets must be a non-empty list of integers >= 0"):
        accuracy_at_budget(two_by_two, budgets)


def test_accuracy_at_budget_empty():
    with pytest.raises(ValueError, match="at least one sample"):
        accuracy_at_budget([])


# ------------------------------------------------------------------ finding the answer in text


@pytest.mark.parametrize("text", ["112", "120", "-12", "3.12", "12.5", "12/5", "12,000", "x_12", "2^12",
                                  "\\frac{1}{12}", "\\frac{12}{5}", "a12", ""])
def test_find_answer_not_inside_a_longer_number(text):
    assert find_answer(text, "12") is None


@pytest.mark.parametrize("text,span", [
    ("12", (0, 2)), ("so 112 then 12 ok", (12, 14)), ("= 12.", (2, 4)), ("\\boxed{12}", (7, 9)),
    ("24-12", (3, 5)), ("(12, 3)", (1, 3)), ("-12 and 12", (8, 10)), ("x = $12$", (5, 7)),
])
def test_find_answer_first_whole_appearance(text, span):
    assert find_answer(text, "12") == span


def test_find_answer_negative_and_expression_answers():
    assert find_answer("x = -3", "-3") == (4, 6)
    assert find_answer("5-3 = 2", "-3") is None  # binary minus: the 3 of 5-3 is not -3
    assert find_answer("2x+1 or x+1", "x+1") == (8, 11)
    assert find_answer("\\frac{3}{4}", " \\frac{3}{4} ") == (0, 11)
    assert find_answer("anything", "  ") is None


# ------------------------------------------------------------------ tokens after the first correct answer


def test_tokens_after_first_correct_hand_values():
    samples = [
        S("p1", 0, True, 10, first=3),    # 10 - 3 - 1 = 6 after, share 0.6
        S("p1", 1, True, 20, first=9),    # 10 after, share 0.5
        S("p2", 0, True, 30),             # correct, answer not found: left out
        S("p2", 1, False, 40, first=2),   # incorrect: left out
    ]
    assert tokens_after_first_correct(samples) == {
        "tokens_after_first_correct": 8.0,
        "tokens_after_first_correct_share": pytest.approx(0.55),
        "tokens_after_first_correct_samples": 2,
    }
    # the answer in the last response token leaves nothing after it
    assert tokens_after_first_correct([S("p", 0, True, 4, first=3)])["tokens_after_first_correct"] == 0.0


def test_tokens_after_first_correct_rejects_an_index_outside_the_response():
    with pytest.raises(ValueError, match=r"problem 'p1' sample 1: first_correct_token 5 is not in \[0, "
                                         r"response_tokens=5\)"):
        tokens_after_first_correct([S("p1", 1, True, 5, first=5)])


def test_samples_saved_before_the_field_still_load_and_summarize(tmp_path):
    old_line = {"problem_id": "p1", "sample_index": 0, "correct": True, "answer": "12", "response_tokens": 8,
                "thinking_tokens": 0, "truncated": False, "text": "\\boxed{12}"}
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(old_line) + "\n" + json.dumps({**old_line, "sample_index": 1, "correct": False}) + "\n")
    samples = read_samples(path)
    assert [s.first_correct_token for s in samples] == [None, None]
    summary = summarize(samples)
    assert summary["tokens_after_first_correct"] is None
    assert summary["tokens_after_first_correct_share"] is None
    assert summary["tokens_after_first_correct_samples"] == 0
    assert summary["accuracy_at_budget"] == {"8": 0.5}


def test_summarize_takes_budgets(two_by_two):
    summary = summarize(two_by_two, budgets=[10, 30])
    assert summary["accuracy_at_budget"] == {"10": 0.25, "30": 0.75}
    assert summary["avg_at_k"] == 1.0  # the verifier's view: the truncated sample is correct
    assert summary["mean_tokens_correct"] == pytest.approx(26.25)
    assert summary["truncation_rate"] == 0.25


def test_summarize_splits_lengths_by_correctness_and_counts_truncation():
    samples = [S("p1", 0, True, 10), S("p1", 1, False, 30, trunc=True), S("p2", 0, False, 50), S("p2", 1, True, 20)]
    summary = summarize(samples)
    # correct 10 and 20 -> 15; incorrect 30 (truncated, still counted) and 50 -> 40; 1 of 4 truncated
    assert (summary["mean_tokens_correct"], summary["mean_tokens_incorrect"]) == (15.0, 40.0)
    assert summary["truncation_rate"] == 0.25 and summary["mean_response_tokens"] == 27.5
    only_correct = summarize([S("p1", 0, True, 10), S("p2", 0, True, 30)])
    assert only_correct["mean_tokens_correct"] == 20.0 and only_correct["mean_tokens_incorrect"] is None
    assert summarize([S("p1", 0, False, 8)])["mean_tokens_correct"] is None


# ------------------------------------------------------------------ token index of the answer


def ids_of(tokenizer, tokens):
    return tokenizer.convert_tokens_to_ids(tokens)


def test_answer_token_skips_a_longer_number_made_of_tokens(tokenizer):
    # "1" + "12" decode to "112", which holds "12" only as part of a longer number
    ids = ids_of(tokenizer, ["1", "12", "▁=", "▁12", "\n", "The", "▁answer", "▁is", "▁\\boxed{", "12", "}"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "112 = 12\nThe answer is \\boxed{12}"
    assert answer_token(ids, tokenizer, "12") == 3
    assert answer_token(ids, tokenizer, "12.") == 3  # the gold answer is normalized as the verifier does
    assert answer_token(ids, tokenizer, "7") is None


def test_answer_token_counts_tokens_that_decode_to_nothing(task, tokenizer):
    from opsdlab.modeling.models import build_tiny_tokenizer

    # The default tiny tokenizer drops <think> when decoding; the same ids give the same index either way.
    keeps = build_tiny_tokenizer(task.tokenizer_corpus(), decode_keeps_think=True)
    ids = ids_of(tokenizer, ["<think>", "\n", "20", "▁+", "▁22", "▁=", "▁42", "\n", "</think>",
                             "▁\\boxed{", "42", "}"])
    assert "<think>" not in tokenizer.decode(ids, skip_special_tokens=True)
    assert "<think>" in keeps.decode(ids, skip_special_tokens=True)
    assert answer_token(ids, tokenizer, "42") == answer_token(ids, keeps, "42") == 6
    # an answer spanning several tokens is complete at its last one
    assert answer_token(ids, tokenizer, "20 + 22") == 4


def test_first_true_any_guess_finds_the_boundary():
    for n in range(1, 9):
        for boundary in range(1, n + 1):
            for guess in range(-1, n + 3):
                calls = []
                found = _first_true(lambda m: calls.append(m) or m >= boundary, n, guess)
                assert found == boundary, (n, boundary, guess)
                assert len(calls) <= 2 * n.bit_length() + 2


# ------------------------------------------------------------------ evaluate


EOS = "<|im_end|>"
# Rows in prompt-major order, k=2 per problem; the gold answer of both problems is 12 (verifier: exact).
SCRIPT = [
    # correct, 11 tokens; "1" + "12" decode to "112"
    ["1", "12", "▁=", "▁12", "\n", "The", "▁answer", "▁is", "▁\\boxed{", "12", "}", EOS],
    ["▁\\boxed{", "7", "}", EOS],  # wrong, 3
    ["▁\\boxed{", "12", "}", EOS],  # correct, 3
    ["▁\\boxed{", "12", "}"] + ["▁ok"] * 9,  # correct but truncated: no EOS within max_new_tokens=12
]


@pytest.fixture
def scripted(tiny_folder, task, monkeypatch):
    """The tiny model and 2 problems, with the responses of both backends replaced by SCRIPT."""
    from opsdlab.modeling.models import load_policy

    model, tokenizer = load_policy(tiny_folder)
    rows = [ids_of(tokenizer, tokens) for tokens in SCRIPT]

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        padded = torch.tensor([row + [pad_token_id] * (max_new_tokens - len(row)) for row in rows])
        return torch.cat([input_ids, padded], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(vllm_backend, "_sample", lambda *args: [
        (row, "stop" if row[-1] == tokenizer.eos_token_id else "length") for row in rows])
    examples = [replace(example, answer="12") for example in task.examples("test", 2)]
    return model, tokenizer, examples


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_evaluate_records_the_answer_token_and_summarizes(scripted, backend, tmp_path):
    model, tokenizer, examples = scripted
    engine = None if backend == "vllm" else model  # vLLM's sampling is scripted: no engine is needed
    samples, summary = evaluate(engine, tokenizer, examples, VerifierConfig(compare="exact"),
                                SamplingConfig(k=2, max_new_tokens=12), backend=backend)
    assert [(s.correct, s.truncated, s.response_tokens) for s in samples] == [
        (True, False, 11), (False, False, 3), (True, False, 3), (True, True, 12)]
    assert [s.first_correct_token for s in samples] == [3, None, 1, 1]
    # after: 11-3-1 = 7, 3-1-1 = 1, 12-1-1 = 10
    assert summary["tokens_after_first_correct"] == pytest.approx(6.0)
    assert summary["tokens_after_first_correct_share"] == pytest.approx((7 / 11 + 1 / 3 + 10 / 12) / 3)
    assert summary["tokens_after_first_correct_samples"] == 3
    # lengths 3, 3, 11, 12 -> p25 3, p50 7, p75 11.25 -> 11, p90 11.7 -> 12, max 12; within budget: the
    # 3-token row of problem 2 from 3 on, the 11-token row of problem 1 from 11 on, never the truncated row
    assert summary["accuracy_at_budget"] == {"3": 0.25, "7": 0.25, "11": 0.5, "12": 0.5}
    assert summary["avg_at_k"] == 0.75 and summary["truncation_rate"] == 0.25
    assert summary["mean_tokens_correct"] == pytest.approx(26 / 3) and summary["mean_tokens_incorrect"] == 3.0
    write_eval(tmp_path, samples, summary)
    assert read_samples(tmp_path / "samples.jsonl") == samples
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy_at_budget"] == summary["accuracy_at_budget"]


def test_evaluate_on_the_tiny_model_writes_the_metrics(tiny_folder, task, tmp_path):
    from opsdlab.modeling.models import load_policy

    model, tokenizer = load_policy(tiny_folder)
    samples, summary = evaluate(model, tokenizer, task.examples("test", 2), VerifierConfig(**task.default_verifier),
                                SamplingConfig(k=2, max_new_tokens=8))
    write_eval(tmp_path, samples, summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    budgets = [int(b) for b in written["accuracy_at_budget"]]
    assert budgets == budget_ladder([s.response_tokens for s in samples]) and budgets == sorted(budgets)
    assert all(0.0 <= v <= 1.0 for v in written["accuracy_at_budget"].values())
    for key in ("tokens_after_first_correct", "tokens_after_first_correct_share", "tokens_after_first_correct_samples",
                "mean_tokens_correct", "mean_tokens_incorrect", "truncation_rate"):
        assert key in written, key
    assert written["tokens_after_first_correct_samples"] == sum(s.first_correct_token is not None for s in samples)
    assert all(s.first_correct_token is None for s in samples if not s.correct)

