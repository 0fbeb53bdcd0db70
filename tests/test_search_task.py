"""The search task: problems, traces, privileged rows, grading, and one pipeline run through it."""

import random
import re
from collections import Counter

import pytest

from opsdlab.tasks.data import pair_unrelated
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt
from opsdlab.tasks import build_task
from opsdlab.config.tasks import SearchConfig
from opsdlab.tasks.search import (CONTEXT_MIX, EXHAUSTED_TEXT, GIVE_UP_TEXT, SearchProblem, SearchTask, behaviour,
                                  code_table, final_line, parse_problem, search_trace, trace_stats)
from opsdlab.tasks.verifier import VerifierConfig, is_correct

VERIFIER = VerifierConfig(**SearchTask.default_verifier)
LINE = re.compile(r"(?:(\d+) \+ |code of )(\d+)(?: =| is) (\d+)(?:, not (\d+)\.|\. found it\.)")
CODE_CONFIG = SearchConfig(check="code")
CODE = code_table(CODE_CONFIG)
# Which of 3, 11, 19, 7, 9, 14 has code 13? Their codes are 12, 15, 14, 6, 3, 13: only 14.
PROBLEM = SearchProblem((3, 11, 19, 7, 9, 14), 13, code=CODE)
# Which of 3, 11, 19, 7, 9, 14 added to 6 makes 20? Only 14.
ADD_PROBLEM = SearchProblem((3, 11, 19, 7, 9, 14), 20, addend=6)


@pytest.fixture(scope="module")
def search_tokenizer():
    from opsdlab.modeling.models import build_tiny_tokenizer

    return build_tiny_tokenizer(SearchTask().tokenizer_corpus())


def test_hand_checked_addition_traces_for_fixed_seeds():
    assert ADD_PROBLEM.answer == 14
    patient = SearchConfig(give_up_rate=0.0, mischeck_rate=0.0)
    assert search_trace(ADD_PROBLEM, patient, random.Random(0)) == (
        "6 + 3 = 9, not 20.\n6 + 11 = 17, not 20.\n6 + 19 = 25, not 20.\n6 + 7 = 13, not 20.\n"
        "6 + 9 = 15, not 20.\n6 + 14 = 20. found it.", 14)
    # Default solver, seed 2: gives up after two failed tries and guesses an untried number (wrong).
    assert search_trace(ADD_PROBLEM, SearchConfig(), random.Random(2)) == (
        "6 + 3 = 9, not 20.\n6 + 11 = 17, not 20.\ntoo many tries, I will guess 7.", 7)
    # Seed 5: 6 + 7 mis-added as 15 (13; still rightly rejected); gives up after five tries and its
    # guess happens to be right.
    assert search_trace(ADD_PROBLEM, SearchConfig(), random.Random(5)) == (
        "6 + 3 = 9, not 20.\n6 + 11 = 17, not 20.\n6 + 19 = 25, not 20.\n6 + 7 = 15, not 20.\n"
        "6 + 9 = 15, not 20.\ntoo many tries, I will guess 14.", 14)
    assert SearchTask().examples("train", 1)[0].problem.endswith("added to 19 makes 25?")


def test_hand_checked_code_traces_for_fixed_seeds():
    assert [CODE[n] for n in PROBLEM.numbers] == [12, 15, 14, 6, 3, 13] and PROBLEM.answer == 14
    assert sorted(CODE) == sorted(CODE.values()) == list(range(1, 20))  # a permutation: one answer
    patient = SearchConfig(give_up_rate=0.0, mischeck_rate=0.0)
    assert search_trace(PROBLEM, patient, random.Random(0)) == (
        "code of 3 is 12, not 13.\ncode of 11 is 15, not 13.\ncode of 19 is 14, not 13.\n"
        "code of 7 is 6, not 13.\ncode of 9 is 3, not 13.\ncode of 14 is 13. found it.", 14)
    # Default solver, seed 2: gives up after two failed tries and guesses an untried number (wrong).
    assert search_trace(PROBLEM, SearchConfig(), random.Random(2)) == (
        "code of 3 is 12, not 13.\ncode of 11 is 15, not 13.\ntoo many tries, I will guess 7.", 7)
    # Seed 5: the code of 7 mis-written as 8 (it is 6; still rightly rejected); gives up after five
    # tries and its guess happens to be right.
    assert search_trace(PROBLEM, SearchConfig(), random.Random(5)) == (
        "code of 3 is 12, not 13.\ncode of 11 is 15, not 13.\ncode of 19 is 14, not 13.\n"
        "code of 7 is 8, not 13.\ncode of 9 is 3, not 13.\ntoo many tries, I will guess 14.", 14)
    with pytest.raises(ValueError, match="0 listed numbers reach"):
        _ = SearchProblem((3, 11), 13, code=CODE).answer
    assert code_table(SearchConfig(code_seed=1)) != CODE


@pytest.mark.parametrize("check", ["add", "code"])
def test_every_reference_answer_verifies_and_its_check_is_right(check):
    task = SearchTask(SearchConfig(check=check))
    for example in task.examples("test", 200) + task.examples("train", 200):
        problem = parse_problem(example.problem, CODE)
        answer = int(example.answer)
        assert answer in problem.numbers and problem.value(answer) == problem.target
        assert len(set(problem.numbers)) == len(problem.numbers)  # so the answer is unique
        left = f"{problem.addend} + {answer} =" if check == "add" else f"code of {answer} is"
        assert example.solution == f"{left} {problem.target}. found it.\nThe answer is {answer}."
        assert is_correct(f"<think>\n{example.solution}\n</think>\n\n{final_line(answer)}", example.answer, VERIFIER)
        assert not is_correct(f"The answer is \\boxed{{{problem.target}}}.", example.answer, VERIFIER)


def _read_trace(trace: str, problem: SearchProblem):
    """Every line parsed and checked: tries of listed numbers, verdicts consistent with written sums."""
    tries, miscomputed = [], 0
    for line in trace.splitlines():
        if match := LINE.fullmatch(line):
            candidate, written = int(match[2]), int(match[3])
            assert candidate in problem.numbers, line
            assert (match[1] is None) == (problem.addend is None) and int(match[1] or 0) == (problem.addend or 0)
            if match[4] is not None:
                assert int(match[4]) == problem.target != written, line
            else:
                assert written == problem.target, line
            if written != problem.value(candidate):
                miscomputed += 1
                assert 1 <= abs(written - problem.value(candidate)) <= 2, line
            tries.append(candidate)
        else:
            assert re.fullmatch(rf"({GIVE_UP_TEXT}|{EXHAUSTED_TEXT}) (\d+)\.", line), line
    return tries, miscomputed


@pytest.mark.parametrize("check", ["add", "code"])
def test_check_lines_are_correct_except_injected_mischecks(check):
    task = SearchTask(SearchConfig(mischeck_rate=0.0, check=check))
    rng = random.Random(1)
    for example in task.examples("sft", 300):
        problem = parse_problem(example.problem, CODE)
        trace, answer = search_trace(problem, task.config, rng)
        tries, miscomputed = _read_trace(trace, problem)
        assert miscomputed == 0
        assert tries == list(problem.numbers[:len(tries)])  # listed order, no repeats
        if tries[-1] == problem.answer:
            assert answer == problem.answer and trace.endswith("found it.")
    noisy = SearchTask(SearchConfig(mischeck_rate=0.5, order="random", check=check))
    total = 0
    for example in noisy.examples("sft", 300):
        problem = parse_problem(example.problem, CODE)
        tries, miscomputed = _read_trace(search_trace(problem, noisy.config, rng)[0], problem)
        assert len(set(tries)) == len(tries)
        total += miscomputed
    assert total > 100  # mis-checks are injected, and only they break the checks


def test_give_up_and_mischecks_decide_the_answer():
    rng = random.Random(2)
    problems = [parse_problem(e.problem, CODE) for e in SearchTask().examples("sft", 200)]
    patient = SearchConfig(give_up_rate=0.0, mischeck_rate=0.0)
    for problem in problems:
        trace, answer = search_trace(problem, patient, rng)
        assert answer == problem.answer and trace_stats(trace).tries == problem.numbers.index(answer) + 1
    hasty = SearchConfig(give_up_rate=1.0, mischeck_rate=0.0)
    for problem in problems:
        stats = trace_stats(search_trace(problem, hasty, rng)[0])
        assert stats.tries == 1 and stats.gave_up == (problem.numbers[0] != problem.answer)
    # Every check mis-computed: the right number is rejected, the search runs out and guesses.
    trace, _ = search_trace(PROBLEM, SearchConfig(give_up_rate=0.0, mischeck_rate=1.0), rng)
    assert EXHAUSTED_TEXT in trace or "found it." in trace


def test_number_of_tries_varies_and_searching_longer_pays(search_tokenizer):
    task = SearchTask()
    rows = task.sft_rows(search_tokenizer, 1000, seed=0)
    examples = task.examples("sft", 1000)
    plain = [(trace_stats(r["completion"]), is_correct(r["completion"], e.answer, VERIFIER))
             for r, e in zip(rows, examples) if r["context"] in ("none", "concise")]
    tries = Counter(stats.tries for stats, _ in plain)
    assert len(tries) >= 6 and max(tries.values()) < 0.5 * len(plain)
    gave_up = [ok for stats, ok in plain if stats.gave_up]
    found = [ok for stats, ok in plain if not stats.gave_up]
    assert 0.3 < len(gave_up) / len(plain) < 0.7
    assert sum(found) / len(found) > 0.9 > 0.5 > sum(gave_up) / len(gave_up)


def test_privileged_rows_go_straight_to_the_answer(search_tokenizer):
    rows = SearchTask().sft_rows(search_tokenizer, 600, seed=0)
    examples = SearchTask().examples("sft", 600)
    counts = Counter(r["context"] for r in rows)
    assert set(counts) == {"none", *CONTEXT_MIX} and 0.4 < counts["none"] / len(rows) < 0.6
    for row, example in zip(rows, examples):
        assert row["completion"].startswith("<think>\n") and row["completion"].endswith(search_tokenizer.eos_token)
        assert row["prompt"] == render_prompt(search_tokenizer, example, context=row["context"])
        if row["context"] in ("solution", "answer"):
            problem = parse_problem(example.problem)
            assert row["completion"].startswith(
                f"<think>\n{problem.addend} + {example.answer} = {problem.target}. found it.\n</think>")
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
    for example in pair_unrelated(task.examples("test", 30)):
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
        build_task("search", {"max_number": 5})
    with pytest.raises(ValueError, match="min_numbers <= max_numbers"):
        build_task("search", {"min_numbers": 5, "max_numbers": 4})
    with pytest.raises(ValueError, match="task 'search'.*give_up"):
        build_task("search", {"give_up": 0.1})
    with pytest.raises(ValueError, match="check must be one of"):
        build_task("search", {"check": "multiply"})
    with pytest.raises(ValueError, match="not a search problem"):
        parse_problem("What is 1 + 2?", CODE)


def test_behaviour_reads_tries_give_ups_and_mischecks():
    problems = {"p": "Which of 3, 11, 19, 7, 9, 14 has code 13?"}
    samples = [
        {"problem_id": "p", "correct": True, "truncated": False,
         "text": "<think>\ncode of 3 is 12, not 13.\ncode of 14 is 13. found it.\n</think>\n\n"
                 "The answer is \\boxed{14}."},
        {"problem_id": "p", "correct": False, "truncated": False,
         "text": "<think>\ncode of 3 is 11, not 13.\ncode of 3 is 12, not 13.\ncode of 5 is 2, not 13.\n"
                 "too many tries, I will guess 7.\n</think>\n\nThe answer is \\boxed{7}."},
    ]
    stats = behaviour(samples, problems, CODE)
    assert stats["mean_tries"] == 2.5 and stats["give_up_rate"] == 0.5 and stats["found_rate"] == 0.5
    assert stats["repeated_tries_per_sample"] == 0.5  # 3 tried twice
    assert stats["valid_try_fraction"] == 0.8  # 5 is not listed (its code, 2, is right)
    assert stats["miscomputed_try_fraction"] == 0.2
    assert stats["accuracy_when_found"] == 1.0 and stats["accuracy_when_gave_up"] == 0.0


def test_pipeline_runs_end_to_end_on_the_search_task(tmp_path):
    from opsdlab.config import load_config
    from opsdlab.run.pipeline import run_pipeline
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
    assert config.task.name == "search" and config.eval.sets == ("search",) and not config.eval.base
    run_pipeline(config)
    for stage in ("sft", "rlvr", "opsd/correct-s0"):
        assert (run_dir / stage / "model" / "COMPLETE").exists()
    assert not (run_dir / "eval" / "base").exists()
    assert (run_dir / "eval" / "opsd-correct-s0" / "search" / "summary.json").exists()
    write_report(run_dir)
    assert "opsd-correct-s0" in (run_dir / "report" / "report.md").read_text()


def test_behaviour_reads_addition_traces():
    problems = {"p": "Which of 3, 11, 19, 7, 9, 14 added to 6 makes 20?"}
    samples = [{"problem_id": "p", "correct": False, "truncated": True,
                "text": "<think>\n6 + 3 = 9, not 20.\n5 + 11 = 16, not 20.\n6 + 19 = 24, not 20.\n6 + 3 = 9, not 20."}]
    stats = behaviour(samples, problems)
    assert stats["mean_tries"] == 4 and stats["give_up_rate"] == 0 and stats["truncation_rate"] == 1
    assert stats["valid_try_fraction"] == 0.75 and stats["miscomputed_try_fraction"] == 0.25
    assert stats["repeated_tries_per_sample"] == 1
