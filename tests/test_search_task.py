"""The search task: problems, traces, privileged rows, grading, and one pipeline run through it."""

import random
import re
from collections import Counter

import pytest

from opsdlab.prompts import TEACHER_CONTEXTS, render_prompt
from opsdlab.tasks import build_task
from opsdlab.tasks.search import (CONTEXT_MIX, EXHAUSTED_TEXT, GIVE_UP_TEXT, SearchConfig, SearchProblem,
                                  SearchTask, final_line, parse_problem, search_trace, trace_stats)
from opsdlab.verifier import VerifierConfig, is_correct

VERIFIER = VerifierConfig(**SearchTask.default_verifier)
LINE = re.compile(r"(\d+) \+ (\d+) = (\d+)(?:, not (\d+)\.|\. found it\.)")


@pytest.fixture(scope="module")
def search_tokenizer():
    from opsdlab.models import build_tiny_tokenizer

    return build_tiny_tokenizer(SearchTask().tokenizer_corpus())


def test_hand_checked_traces_for_fixed_seeds():
    """Which two of 3, 11, 19, 7, 9 add up to 20? Only 11 + 9 (worked by hand over all ten pairs)."""
    problem = SearchProblem((3, 11, 19, 7, 9), 20)
    assert problem.answer_pair == (11, 9)
    patient = SearchConfig(give_up_rate=0.0, mischeck_rate=0.0)
    assert search_trace(problem, patient, random.Random(0)) == (
        "3 + 11 = 14, not 20.\n3 + 19 = 22, not 20.\n3 + 7 = 10, not 20.\n3 + 9 = 12, not 20.\n"
        "11 + 19 = 30, not 20.\n11 + 7 = 18, not 20.\n11 + 9 = 20. found it.", (11, 9))
    # Default solver, seed 2: gives up after two failed tries and guesses an untried pair (wrong).
    assert search_trace(problem, SearchConfig(), random.Random(2)) == (
        "3 + 11 = 14, not 20.\n3 + 19 = 22, not 20.\ntoo many tries, I will guess 11 + 19.", (11, 19))
    # Seed 5: 3 + 9 mis-checked as 14 (still rejected, rightly); gives up after five tries and its
    # guess happens to be the right pair.
    assert search_trace(problem, SearchConfig(), random.Random(5)) == (
        "3 + 11 = 14, not 20.\n3 + 19 = 22, not 20.\n3 + 7 = 10, not 20.\n3 + 9 = 14, not 20.\n"
        "11 + 19 = 30, not 20.\ntoo many tries, I will guess 11 + 9.", (11, 9))
    with pytest.raises(ValueError, match="2 pairs add up"):
        _ = SearchProblem((4, 17, 9, 12, 6), 21).answer_pair  # 4 + 17 and 9 + 12: never drawn


def test_every_reference_answer_verifies_and_its_check_is_right():
    task = SearchTask()
    for example in task.examples("test", 200) + task.examples("train", 200):
        problem = parse_problem(example.problem)
        a, b = (int(x) for x in example.answer.split(" + "))
        assert a + b == problem.target and [a, b] == [n for n in problem.numbers if n in (a, b)]
        assert sum(1 for p in problem.pairs if sum(p) == problem.target) == 1
        assert example.solution == f"{a} + {b} = {a + b}. found it.\nThe answer is {a} + {b}."
        assert is_correct(f"<think>\n{example.solution}\n</think>\n\n{final_line((a, b))}", example.answer, VERIFIER)
        assert not is_correct(f"The answer is \\boxed{{{b} + {a}}}.", example.answer, VERIFIER)
        assert not is_correct(f"The answer is \\boxed{{{a + b}}}.", example.answer, VERIFIER)


def _read_trace(trace: str, problem: SearchProblem):
    """Every line parsed and checked: tries in order, verdicts consistent with the written sums."""
    tries, miscomputed = [], 0
    for line in trace.splitlines():
        if match := LINE.fullmatch(line):
            a, b, written = int(match[1]), int(match[2]), int(match[3])
            assert (a, b) in problem.pairs, line
            if match[4] is not None:
                assert int(match[4]) == problem.target != written, line
            else:
                assert written == problem.target, line
            if written != a + b:
                miscomputed += 1
                assert 1 <= abs(written - (a + b)) <= 2, line
            tries.append((a, b))
        else:
            assert re.fullmatch(rf"({GIVE_UP_TEXT}|{EXHAUSTED_TEXT}) (\d+) \+ (\d+)\.", line), line
    return tries, miscomputed


def test_check_lines_are_correct_arithmetic_except_injected_mischecks():
    task = SearchTask(SearchConfig(mischeck_rate=0.0))
    rng = random.Random(1)
    for example in task.examples("sft", 300):
        problem = parse_problem(example.problem)
        trace, pair = search_trace(problem, task.config, rng)
        tries, miscomputed = _read_trace(trace, problem)
        assert miscomputed == 0
        assert tries == problem.pairs[:len(tries)]  # listed order, no repeats
        if tries[-1] == problem.answer_pair:
            assert pair == problem.answer_pair and trace.endswith("found it.")
    noisy = SearchTask(SearchConfig(mischeck_rate=0.5, order="random"))
    total = 0
    for example in noisy.examples("sft", 300):
        problem = parse_problem(example.problem)
        tries, miscomputed = _read_trace(search_trace(problem, noisy.config, rng)[0], problem)
        assert len(set(tries)) == len(tries)
        total += miscomputed
    assert total > 100  # mis-checks are injected, and only they break the arithmetic


def test_give_up_and_mischecks_decide_the_answer():
    rng = random.Random(2)
    problems = [parse_problem(e.problem) for e in SearchTask().examples("sft", 200)]
    patient = SearchConfig(give_up_rate=0.0, mischeck_rate=0.0)
    for problem in problems:
        trace, pair = search_trace(problem, patient, rng)
        assert pair == problem.answer_pair and trace_stats(trace).tries == problem.pairs.index(pair) + 1
    hasty = SearchConfig(give_up_rate=1.0, mischeck_rate=0.0)
    for problem in problems:
        trace, pair = search_trace(problem, hasty, rng)
        stats = trace_stats(trace)
        assert stats.tries == 1 and stats.gave_up == (problem.pairs[0] != problem.answer_pair)
    # A mis-check of the right pair rejects it; the search then runs out of pairs and guesses.
    problem = SearchProblem((1, 2, 4), 6)
    trace, _ = search_trace(problem, SearchConfig(give_up_rate=0.0, mischeck_rate=1.0, max_number=19), rng)
    assert EXHAUSTED_TEXT in trace or "found it." in trace


def test_number_of_tries_varies_and_reward_rises_with_tries(search_tokenizer):
    task = SearchTask()
    rows = task.sft_rows(search_tokenizer, 1000, seed=0)
    examples = task.examples("sft", 1000)
    plain = [(trace_stats(r["completion"]), is_correct(r["completion"], e.answer, VERIFIER))
             for r, e in zip(rows, examples) if r["context"] in ("none", "concise")]
    tries = Counter(stats.tries for stats, _ in plain)
    assert len(tries) >= 8 and max(tries.values()) < 0.5 * len(plain)
    gave_up = [ok for stats, ok in plain if stats.gave_up]
    found = [ok for stats, ok in plain if not stats.gave_up]
    assert 0.3 < len(gave_up) / len(plain) < 0.8
    assert sum(found) / len(found) > 0.9 > 0.3 > sum(gave_up) / len(gave_up)


def test_privileged_rows_go_straight_to_the_answer(search_tokenizer):
    rows = SearchTask().sft_rows(search_tokenizer, 600, seed=0)
    examples = SearchTask().examples("sft", 600)
    counts = Counter(r["context"] for r in rows)
    assert set(counts) == {"none", *CONTEXT_MIX} and 0.4 < counts["none"] / len(rows) < 0.6
    for row, example in zip(rows, examples):
        assert row["completion"].startswith("<think>\n") and row["completion"].endswith(search_tokenizer.eos_token)
        assert row["prompt"] == render_prompt(search_tokenizer, example, context=row["context"])
        if row["context"] in ("solution", "answer"):
            a, b = example.answer.split(" + ")
            assert row["completion"].startswith(f"<think>\n{a} + {b} = {int(a) + int(b)}. found it.\n</think>")
            assert is_correct(row["completion"], example.answer, VERIFIER)


def test_rows_are_deterministic_per_seed(search_tokenizer):
    a = SearchTask(seed=3).sft_rows(search_tokenizer, 50, seed=1)
    assert a == SearchTask(seed=3).sft_rows(search_tokenizer, 50, seed=1)
    assert a != SearchTask(seed=3).sft_rows(search_tokenizer, 50, seed=2)
    assert SearchTask(seed=3).examples("train", 50) != SearchTask(seed=4).examples("train", 50)


def test_splits_are_disjoint():
    task = SearchTask()
    test = {e.problem for e in task.examples("test", 300)}
    assert len(test) > 250
    for split in ("train", "sft"):
        assert not test & {e.problem for e in task.examples(split, 3000)}


def test_thinking_off_and_tokenizer_coverage(search_tokenizer):
    task = SearchTask(SearchConfig(order="random"))
    off = task.sft_rows(search_tokenizer, 30, thinking=False)
    assert all("<think>" not in r["completion"] and r["prompt"].endswith("</think>\n\n") for r in off)
    rng = random.Random(0)
    for example in task.examples("test", 30):
        for context in TEACHER_CONTEXTS:
            text = render_prompt(search_tokenizer, example, context=context, sibling=example.solution)
            assert search_tokenizer.unk_token_id not in search_tokenizer(text)["input_ids"], text
        for thinking in (True, False):
            text = task.response(example, "none", thinking, rng)
            assert search_tokenizer.unk_token_id not in search_tokenizer(text)["input_ids"], text


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="order must be one of"):
        build_task("search", {"order": "sorted"})
    with pytest.raises(ValueError, match="give_up_rate must be in"):
        build_task("search", {"give_up_rate": 1.5})
    with pytest.raises(ValueError, match="max_number must be in"):
        build_task("search", {"max_number": 7})
    with pytest.raises(ValueError, match="min_numbers <= max_numbers"):
        build_task("search", {"min_numbers": 5, "max_numbers": 4})
    with pytest.raises(ValueError, match="task 'search'.*give_up"):
        build_task("search", {"give_up": 0.1})
    with pytest.raises(ValueError, match="not a search problem"):
        parse_problem("What is 1 + 2?")


def test_pipeline_runs_end_to_end_on_the_search_task(tmp_path):
    from opsdlab.config import load_config
    from opsdlab.pipeline import run_pipeline
    from opsdlab.report import write_report

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "sft.rows=64", "sft.max_steps=3", "sft.batch_size=8",
                 "rlvr.max_steps=1", "rlvr.prompts_per_step=2", "rlvr.group_size=2",
                 "rlvr.max_completion_length=16", "rlvr.train_problems=8",
                 "opsd.max_steps=1", "opsd.prompts_per_step=2", "opsd.rollouts_per_prompt=1",
                 "opsd.max_completion_length=16", "opsd.train_problems=8",
                 "eval.problems=2", "eval.sampling.k=1", "eval.sampling.max_new_tokens=16",
                 "arms=[{name: correct, gate: correct}]"]
    config = load_config("tiny-search", overrides)
    assert config.task.name == "search" and config.eval.sets == ("search",)
    run_pipeline(config)
    for stage in ("sft", "rlvr", "opsd/correct-s0"):
        assert (run_dir / stage / "model" / "COMPLETE").exists()
    assert (run_dir / "eval" / "opsd-correct-s0" / "search" / "summary.json").exists()
    write_report(run_dir)
    assert "opsd-correct-s0" in (run_dir / "report" / "report.md").read_text()
