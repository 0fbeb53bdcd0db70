"""Tests for opsdlab.evaluation.metrics (summary, bootstrap, comparison, diagnostics) against hand-computed
values on hand-built samples."""

from __future__ import annotations

import json
import math

import pytest

from opsdlab.evaluation.metrics.bootstrap import mean_ci
from opsdlab.evaluation.metrics.comparison import bootstrap_diff_ci, flips, length_change
from opsdlab.evaluation.metrics.diagnostics import (HESITATION_MARKERS, hesitation_density, per_position_mean,
                                                    top_tokens_by_shift)
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import pass_at_k, per_problem_accuracy, summarize


def S(pid, idx, correct, answer=None, resp=100, think=50, trunc=False, text=""):
    return Sample(pid, idx, correct, answer, resp, think, trunc, text)


def problem(pid, corrects, resp=100):
    """Samples of one problem with the given correctness list and constant length."""
    return [S(pid, i, c, resp=resp) for i, c in enumerate(corrects)]


@pytest.fixture
def two_problems():
    # p1: answers 5,3,3,5 -> a 2-2 tie, "5" occurs first and is correct.
    # Given out of index order so tie-breaking must use sample_index.
    p1 = [
        S("p1", 3, True, "5", resp=100, think=60),
        S("p1", 1, False, "3", resp=200, think=150),
        S("p1", 0, True, "5", resp=100, think=80),
        S("p1", 2, False, "3", resp=300, think=250, trunc=True),
    ]
    # p2: no answer extracted at all (all truncated) -> maj counts it wrong.
    p2 = [S("p2", i, False, None, resp=400, think=400, trunc=True) for i in range(4)]
    return p1 + p2


# ---------------------------------------------------------------- pass_at_k


def test_pass_at_k_hand_values():
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every pair has a correct one
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c/n


def test_pass_at_k_matches_binomial_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    v = pass_at_k(10_000, 5, 100)
    assert 0.0 < v < 1.0 and math.isfinite(v)


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0), (0, 0, 1)])
def test_pass_at_k_errors(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- summarize


def test_summarize_hand_values(two_problems):
    r = summarize(two_problems)
    assert r["num_problems"] == 2
    assert r["num_samples"] == 8
    assert r["samples_per_problem"] == 4
    assert r["k"] == 4
    assert r["avg_at_k"] == pytest.approx(0.25)  # (2/4 + 0/4) / 2
    # per-problem accuracies [0.5, 0]: std(ddof=1)=sqrt(0.125), / sqrt(2) = 0.25
    assert r["avg_at_k_stderr"] == pytest.approx(0.25)
    assert r["pass_at_k"] == pytest.approx(0.5)  # p1: 1.0, p2: 0.0
    assert r["maj_at_k"] == pytest.approx(0.5)  # p1 tie -> "5" correct; p2 all None
    # lengths: 100,100,200,300,400,400,400,400
    assert r["mean_response_tokens"] == pytest.approx(287.5)
    assert r["median_response_tokens"] == pytest.approx(350.0)
    assert r["mean_thinking_tokens"] == pytest.approx((540 + 1600) / 8)
    assert r["truncation_rate"] == pytest.approx(5 / 8)
    assert r["mean_tokens_correct"] == pytest.approx(100.0)
    assert r["mean_tokens_incorrect"] == pytest.approx((200 + 300 + 1600) / 6)
    # lengths sorted 100,100,200,300,400x4: p25 175, p50 350, p75 = p90 = max = 400; correct and not
    # truncated within each: p1's two 100-token samples (2/4), none of p2 -> 0.25 everywhere
    assert r["accuracy_at_budget"] == {"175": 0.25, "350": 0.25, "400": 0.25}
    # no sample records where its answer first appeared
    assert r["tokens_after_first_correct"] is None and r["tokens_after_first_correct_share"] is None
    assert r["tokens_after_first_correct_samples"] == 0
    lo, hi = r["avg_at_k_ci"]
    assert lo <= r["avg_at_k"] <= hi
    assert 0.0 <= lo and hi <= 0.5  # bounded by the per-problem accuracies
    json.dumps(r)  # JSON-able


def test_summarize_pass_at_smaller_k(two_problems):
    r = summarize(two_problems, k=2)
    assert r["k"] == 2
    # p1: 1 - C(2,2)/C(4,2) = 5/6, p2: 0
    assert r["pass_at_k"] == pytest.approx(5 / 12)
    assert r["avg_at_k"] == pytest.approx(0.25)


def test_summarize_k_out_of_range(two_problems):
    with pytest.raises(ValueError, match="k"):
        summarize(two_problems, k=5)


def test_summarize_none_when_no_correct_or_incorrect():
    all_right = problem("a", [True, True])
    r = summarize(all_right)
    assert r["mean_tokens_incorrect"] is None
    assert r["mean_tokens_correct"] == pytest.approx(100.0)
    r = summarize(problem("a", [False, False]))
    assert r["mean_tokens_correct"] is None


def test_maj_tie_goes_to_first_occurrence_even_if_wrong():
    # "a" (wrong) at index 0, "b" (right) at 1 and 2, "a" at 3: 2-2 tie -> "a".
    samples = [
        S("q", 3, False, "a"),
        S("q", 2, True, "b"),
        S("q", 1, True, "b"),
        S("q", 0, False, "a"),
    ]
    assert summarize(samples)["maj_at_k"] == 0.0


def test_maj_none_answers_do_not_vote_and_any_correct_counts():
    # None x3 would win if it voted; "x" wins, and one "x" sample is correct.
    samples = [
        S("q", 0, False, None),
        S("q", 1, False, None),
        S("q", 2, False, None),
        S("q", 3, False, "x"),
        S("q", 4, True, "x"),
    ]
    assert summarize(samples)["maj_at_k"] == 1.0


def test_summarize_uneven_samples_names_problem():
    samples = problem("p1", [True] * 4) + problem("p2", [True] * 3) + problem("p3", [False] * 4)
    with pytest.raises(ValueError, match=r"'p2' has 3"):
        summarize(samples)


def test_summarize_duplicate_index_names_problem():
    samples = [S("p9", 0, True), S("p9", 0, False)]
    with pytest.raises(ValueError, match="p9"):
        summarize(samples)


def test_summarize_empty():
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_bootstrap_deterministic_and_seeded():
    samples = []
    for i, c in enumerate([0, 1, 2, 3, 4, 1, 2, 4]):
        samples += problem(f"p{i}", [True] * c + [False] * (4 - c))
    a = summarize(samples, seed=123)
    b = summarize(samples, seed=123)
    assert a["avg_at_k_ci"] == b["avg_at_k_ci"]
    lo, hi = a["avg_at_k_ci"]
    assert lo < a["avg_at_k"] < hi
    c = summarize(samples, seed=7)
    assert c["avg_at_k"] == a["avg_at_k"]
    narrow = summarize(samples, seed=123, confidence=0.5)["avg_at_k_ci"]
    assert lo <= narrow[0] <= narrow[1] <= hi


def test_summarize_ci_degenerate_when_all_problems_equal():
    samples = []
    for i in range(5):
        samples += problem(f"p{i}", [True, False, True, False])
    r = summarize(samples)
    assert r["avg_at_k_ci"] == [0.5, 0.5]
    assert r["avg_at_k"] == 0.5
    assert r["avg_at_k_stderr"] == 0.0


# ---------------------------------------------------------------- mean_ci


def test_mean_ci_single_value():
    assert mean_ci([0.42]) == (0.42, 0.42, 0.42)


def test_mean_ci_contains_mean_and_deterministic():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0], seed=3)
    assert m == pytest.approx(2.5)
    assert 1.0 <= lo <= m <= hi <= 4.0
    assert mean_ci([1.0, 2.0, 3.0, 4.0], seed=3) == (m, lo, hi)


def test_mean_ci_errors():
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], n_bootstrap=0)


# ---------------------------------------------------------------- per-problem / flips


def test_per_problem_accuracy(two_problems):
    assert per_problem_accuracy(two_problems) == {"p1": 0.5, "p2": 0.0}


def _eval(accs, n=4):
    out = []
    for pid, a in accs.items():
        c = round(a * n)
        out += problem(pid, [True] * c + [False] * (n - c))
    return out


def test_flips_hand_pair():
    before = _eval({"a": 1.0, "b": 0.0, "c": 0.75, "d": 0.25, "e": 0.5})
    after = _eval({"a": 0.25, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.75})
    r = flips(before, after)
    # solved means acc > 0.5: before {a, c}; after {b, c, e} ("e" at 0.5 was unsolved)
    assert r["correct_to_incorrect"] == 1
    assert r["incorrect_to_correct"] == 2
    assert r["stayed_correct"] == 1
    assert r["stayed_incorrect"] == 1
    assert r["correct_to_incorrect_ids"] == ["a"]
    assert r["incorrect_to_correct_ids"] == ["b", "e"]
    assert r["mean_accuracy_change_per_problem"] == pytest.approx(0.1)
    json.dumps(r)
    # lower threshold: "e" (0.5) now counts as solved before, so it stays correct
    r2 = flips(before, after, threshold=0.4)
    assert r2["incorrect_to_correct_ids"] == ["b"]
    assert r2["stayed_correct"] == 2


def test_flips_mismatched_problems_named():
    before = _eval({"a": 1.0, "b": 0.0})
    after = _eval({"a": 1.0, "zz": 0.0})
    with pytest.raises(ValueError, match=r"'b'.*'zz'"):
        flips(before, after)


# ---------------------------------------------------------------- length / paired bootstrap


def test_length_change():
    assert length_change(200.0, 150.0) == pytest.approx(-0.25)
    assert length_change(100.0, 120.0) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        length_change(0.0, 10.0)


def test_bootstrap_diff_ci_hand_values():
    before = problem("a", [True, False], resp=100) + problem("b", [False, False], resp=300) \
        + problem("c", [True, True], resp=200)
    after = problem("a", [True, True], resp=50) + problem("b", [True, False], resp=150) \
        + problem("c", [True, True], resp=160)
    r = bootstrap_diff_ci(before, after, seed=1)
    assert r["num_problems"] == 3
    assert r["accuracy_before"] == pytest.approx(0.5)  # (0.5 + 0 + 1) / 3
    assert r["accuracy_after"] == pytest.approx(5 / 6)  # (1 + 0.5 + 1) / 3
    assert r["accuracy_diff"] == pytest.approx(1 / 3)
    assert r["mean_length_before"] == pytest.approx(200.0)
    assert r["mean_length_after"] == pytest.approx(120.0)
    assert r["length_change"] == pytest.approx(-0.4)
    lo, hi = r["accuracy_diff_ci"]
    assert 0.0 <= lo <= r["accuracy_diff"] <= hi <= 0.5  # per-problem diffs 0.5, 0.5, 0
    lo, hi = r["length_change_ci"]
    assert lo <= r["length_change"] <= hi < 0
    assert bootstrap_diff_ci(before, after, seed=1) == r
    json.dumps(r)


def test_bootstrap_diff_ci_degenerate_when_uniform_change():
    before, after = [], []
    for i in range(4):
        before += problem(f"p{i}", [True, True, False, False], resp=100)
        after += problem(f"p{i}", [True, True, True, False], resp=50)
    r = bootstrap_diff_ci(before, after)
    assert r["accuracy_diff_ci"] == pytest.approx([0.25, 0.25])
    assert r["length_change_ci"] == pytest.approx([-0.5, -0.5])


def test_bootstrap_diff_ci_mismatched_problems_named():
    with pytest.raises(ValueError, match="'gone'"):
        bootstrap_diff_ci(problem("x", [True]) + problem("gone", [True]), problem("x", [True]))


# ---------------------------------------------------------------- hesitation density


def test_hesitation_density_counts_whole_words_case_insensitive():
    texts = [
        "Wait, that is wrong. HMM. Let me check again.",
        "I am waiting for the double-check; actually fine",
    ]
    r = hesitation_density(texts)
    c = r["counts"]
    assert set(c) == set(HESITATION_MARKERS)
    assert c["wait"] == 1  # "Wait," yes, "waiting" no
    assert c["hmm"] == 1
    assert c["let me check"] == 1
    assert c["double-check"] == 1
    assert c["actually"] == 1
    assert c["perhaps"] == 0 and c["alternatively"] == 0
    assert r["total_markers"] == 5
    assert r["total_tokens"] == 17  # 9 + 8 whitespace words
    assert r["density"] == pytest.approx(5 * 1000 / 17)
    json.dumps(r)


def test_hesitation_density_with_token_counts_and_phrases():
    texts = ["Hmmm, wait wait. Let me\ncheck.", "Perhaps... ALTERNATIVELY"]
    r = hesitation_density(texts, token_counts=[40, 60], per_tokens=100)
    assert r["counts"]["hmm"] == 0  # "Hmmm" is a different word
    assert r["counts"]["wait"] == 2
    assert r["counts"]["let me check"] == 1  # newline inside the phrase still matches
    assert r["total_markers"] == 5
    assert r["total_tokens"] == 100
    assert r["density"] == pytest.approx(5.0)
    assert r["per_marker_density"]["wait"] == pytest.approx(2.0)


def test_hesitation_density_custom_markers_and_errors():
    r = hesitation_density(["so so", ""], markers=("so",))
    assert r["counts"] == {"so": 2}
    assert r["density"] == pytest.approx(1000.0)
    assert hesitation_density([])["density"] == 0.0
    with pytest.raises(ValueError):
        hesitation_density(["a"], token_counts=[1, 2])


# ---------------------------------------------------------------- per-position mean


def test_per_position_mean_ragged():
    rows = [[1.0, 2.0, 3.0, 4.0], [3.0, 4.0], [8.0], []]
    assert per_position_mean(rows) == pytest.approx([4.0, 3.0, 3.0, 4.0])
    # bucket 2: {1,3,8,2,4} -> 3.6; {3,4} -> 3.5
    assert per_position_mean(rows, bucket=2) == pytest.approx([3.6, 3.5])
    # bucket 3 leaves a partial last bucket: {1,3,8,2,4,3} -> 3.5; {4} -> 4
    assert per_position_mean(rows, bucket=3) == pytest.approx([3.5, 4.0])
    assert per_position_mean(rows, max_len=2) == pytest.approx([4.0, 3.0])
    assert per_position_mean(rows, bucket=2, max_len=3) == pytest.approx([3.6, 3.0])


def test_per_position_mean_edge_cases():
    assert per_position_mean([]) == []
    assert per_position_mean([[], []]) == []
    assert per_position_mean([[1.0, 2.0]], max_len=0) == []
    with pytest.raises(ValueError):
        per_position_mean([[1.0]], bucket=0)


# ---------------------------------------------------------------- top tokens


def test_top_tokens_by_shift():
    records = (
        [("Wait", -2.0)] * 5
        + [("Hmm", -1.0), ("Hmm", -0.5)] * 3  # mean -0.75, count 6
        + [("So", 0.5)] * 5
        + [("The", 1.0), ("The", 2.0)] * 3  # mean 1.5, count 6
        + [("rare", -10.0)] * 4  # below min_count
        + [("neutral", 0.0)] * 5  # neither lowered nor raised
        + [("Wait", float("nan"))]
    )
    r = top_tokens_by_shift(records)
    assert [e["token"] for e in r["lowered"]] == ["Wait", "Hmm"]
    assert [e["token"] for e in r["raised"]] == ["The", "So"]
    assert r["lowered"][0] == {"token": "Wait", "mean_shift": -2.0, "count": 5}
    assert r["lowered"][1]["mean_shift"] == pytest.approx(-0.75)
    assert r["raised"][0]["mean_shift"] == pytest.approx(1.5)
    assert r["raised"][0]["count"] == 6
    assert r["num_records"] == len(records)
    assert r["num_skipped_nonfinite"] == 1
    assert r["num_distinct_tokens"] == 6
    assert r["num_eligible"] == 5
    json.dumps(r)

    r1 = top_tokens_by_shift(records, n=1)
    assert [e["token"] for e in r1["lowered"]] == ["Wait"]
    assert [e["token"] for e in r1["raised"]] == ["The"]
    r_all = top_tokens_by_shift(records, min_count=1)
    assert r_all["lowered"][0]["token"] == "rare"


def test_top_tokens_by_shift_errors():
    with pytest.raises(ValueError):
        top_tokens_by_shift([], n=-1)
    with pytest.raises(ValueError):
        top_tokens_by_shift([], min_count=0)


def test_accuracy_efficiency_score_hand_computed():
    from opsdlab.evaluation.metrics.comparison import accuracy_efficiency_score as aes

    # 20% shorter, accuracy 0.50 -> 0.55 (+10% relative): 0.2 + 3 * 0.1 = 0.5
    assert aes(0.50, 0.55, 100, 80) == pytest.approx(0.5)
    # 20% shorter, accuracy 0.50 -> 0.45 (-10% relative): 0.2 - 5 * 0.1 = -0.3
    assert aes(0.50, 0.45, 100, 80) == pytest.approx(-0.3)
    # 10% longer at equal accuracy: -0.1
    assert aes(0.40, 0.40, 50, 55) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="reference"):
        aes(0.0, 0.1, 100, 80)


# ---------------------------------------------------------------- collapse signs


def test_longest_run_counts_the_tokens_of_a_periodic_stretch():
    from opsdlab.evaluation.metrics.collapse import longest_run

    # 7 8 9 | 1 2 1 2 1 2 1 | 5: with period 2 tokens 4..9 (0-based 3..9) repeat: 1 2 1 2 1 2 1 = 7 tokens.
    ids = [7, 8, 9, 1, 2, 1, 2, 1, 2, 1, 5]
    assert longest_run(ids, 2) == 7
    assert longest_run(ids, 1) == 0 and longest_run(ids, 3) == 0  # no token equals the one 1 or 3 before it
    assert longest_run([4, 4, 4], 1) == 3 and longest_run([4], 1) == 0 and longest_run([], 1) == 0


def test_repeats_needs_three_copies_and_thirty_two_tokens():
    from opsdlab.evaluation.metrics.collapse import MIN_RUN, repeats

    assert MIN_RUN == 32
    block = list(range(100, 111))  # 11 tokens: 3 copies span 33 >= 32
    assert repeats([1, 2] + block * 3 + [3])
    assert not repeats(block * 2 + block[:9])  # 31 tokens of period 11: under 32
    assert not repeats(list(range(10, 20)) * 3)  # 3 copies of 10 tokens span 30 < 32
    assert repeats(list(range(10, 20)) * 3 + list(range(10, 12)))  # the run goes on into a 4th copy: 32
    assert repeats([5] * 32) and not repeats([5] * 31)  # one token: 32 copies
    assert not repeats([5, 6] * 15 + [5])  # period 2: 31 tokens
    assert repeats([5, 6] * 16)
    # A 128-token block repeated three times (384 tokens) counts; a 129-token one is past MAX_PERIOD.
    assert repeats(list(range(128)) * 3) and not repeats(list(range(129)) * 3)
    assert not repeats(list(range(1000)))  # no token repeats at all


def test_summaries_report_the_repetition_rate_and_token_weighted_entropy():
    samples = [Sample("a", 0, True, "1", 3, 0, False, repeats=True, token_entropy=2.0),  # 4 positions (EOS)
               Sample("a", 1, False, None, 4, 0, True, repeats=False, token_entropy=0.5),  # 4 positions (cut)
               Sample("b", 0, False, None, 10, 0, True, repeats=False, token_entropy=None),
               Sample("b", 1, False, None, 2, 0, False, repeats=None, token_entropy=None)]
    summary = summarize(samples)
    assert summary["repetition_rate"] == pytest.approx(1 / 3)  # of the three samples that record it
    assert summary["mean_token_entropy"] == pytest.approx((2.0 * 4 + 0.5 * 4) / 8)
    old = summarize([S("a", 0, True), S("a", 1, False)])  # samples saved before the fields existed
    assert old["repetition_rate"] is None and old["mean_token_entropy"] is None
