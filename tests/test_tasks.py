import random
import re

import pytest

from opsdlab.tasks.data import pair_unrelated
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt
from opsdlab.tasks import build_task
from opsdlab.config.tasks import SyntheticConfig
from opsdlab.tasks.synthetic import SyntheticTask, TraceStyle, terms_of, thinking_trace


def test_examples_are_seeded_and_splits_disjoint():
    a, b = SyntheticTask(seed=3), SyntheticTask(seed=3)
    assert a.examples("train", 50) == b.examples("train", 50)
    assert a.examples("train", 50) != SyntheticTask(seed=4).examples("train", 50)
    test = {e.problem for e in a.examples("test", 500)}
    assert not test & {e.problem for e in a.examples("train", 2000)}


def test_reference_solution_and_answer_are_consistent():
    for example in SyntheticTask().examples("test", 100):
        terms = terms_of(example)
        assert example.answer == str(sum(terms))
        assert example.solution.endswith(f"The answer is {sum(terms)}.")


def test_trace_running_totals_follow_from_written_values():
    """Each step adds the next term to the previous *written* total; a re-check repairs a slip."""
    rng = random.Random(0)
    style = TraceStyle(slip=0.5, recheck=0.5, filler=0.3, restart=0.0)
    for _ in range(200):
        terms = [rng.randint(1, 9) for _ in range(5)]
        trace, total = thinking_trace(terms, style, rng)
        previous, added = terms[0], []
        for line in trace.splitlines():
            if step := re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line):
                a, b, written = map(int, step.groups())
                assert a == previous
                step_a, step_b = a, b
                added.append(b)
                previous = written
            elif check := re.fullmatch(r"wait, let me check: (\d+) \+ (\d+) = (\d+)(, not (\d+))?\.( ok\.)?", line):
                a, b, true = int(check[1]), int(check[2]), int(check[3])
                assert (a, b) == (step_a, step_b) and a + b == true
                if check[4]:
                    assert int(check[5]) == previous != true  # a slip, caught and repaired
                else:
                    assert previous == true
                previous = true
            else:
                assert line == "hmm.", line
        assert added == terms[1:]
        assert total == previous


def test_uncaught_slips_make_wrong_answers_and_rechecks_catch_them():
    rng = random.Random(1)
    one_step = [3, 4]  # a single slip cannot be cancelled by a later one
    assert all(thinking_trace(one_step, TraceStyle(1.0, 0.0, 0.0, 0.0), rng)[1] != 7 for _ in range(50))
    terms = [3, 4, 5, 6]
    fixed = [thinking_trace(terms, TraceStyle(1.0, 1.0, 0.0, 0.0), rng)[1] for _ in range(50)]
    assert fixed == [18] * 50
    restarted = [thinking_trace(terms, TraceStyle(1.0, 0.0, 0.0, 1.0), rng)[1] for _ in range(50)]
    assert restarted == [18] * 50


def _mean_length(task, context, n=400):
    rng = random.Random(0)
    examples = task.examples("sft", n)
    return sum(len(task.response(e, context, True, rng)) for e in examples) / n


def test_privileged_style_knob_controls_the_stylistic_cue():
    concise = SyntheticTask(SyntheticConfig(privileged_style="concise"))
    same = SyntheticTask(SyntheticConfig(privileged_style="same"))
    assert _mean_length(concise, "solution") < 0.85 * _mean_length(concise, "none")
    # The control: with the solution in the prompt the trace is exact but no shorter than plain traces
    # beyond what removing slips changes.
    assert _mean_length(same, "solution") == pytest.approx(_mean_length(same, "none"), rel=0.1)
    assert same.style("solution").slip == 0.0 and same.style("none").slip > 0


def test_sft_rows_mix_roles_through_the_one_renderer(tokenizer):
    task = SyntheticTask()
    rows = task.sft_rows(tokenizer, 400)
    contexts = {r["context"] for r in rows}
    assert {"none", "solution"} <= contexts
    for row in rows[:50]:
        assert row["prompt"].startswith("<|im_start|>user\n")
        assert row["completion"].endswith(tokenizer.eos_token)
        assert row["completion"].startswith("<think>\n")
    off = task.sft_rows(tokenizer, 20, thinking=False)
    assert all("<think>" not in r["completion"] and r["prompt"].endswith("</think>\n\n") for r in off)


def test_privileged_rows_mostly_read_the_reference_and_copy_its_totals(tokenizer):
    """The privileged share is mostly reference-solution rows (a model learns to copy from a reference
    only from rows that show one), every context of the mix appears, and in the informed rows every
    running total the trace writes is one the reference wrote."""
    from opsdlab.tasks.synthetic import CONTEXT_MIX

    task = SyntheticTask()
    rows = task.sft_rows(tokenizer, 2000)
    counts = {c: sum(r["context"] == c for r in rows) for c in ("none", *CONTEXT_MIX)}
    privileged = len(rows) - counts["none"]
    assert 0.45 < privileged / len(rows) < 0.55
    assert counts["solution"] / privileged > 0.85
    assert all(counts[c] > 0 for c in CONTEXT_MIX)
    for row in [r for r in rows if r["context"] == "solution"][:200]:
        reference = row["prompt"].split("Here is a reference solution:\n", 1)[1]
        written = re.findall(r"^(\d+ \+ \d+ = \d+)$", row["completion"], re.M)
        assert written and set(written) <= set(re.findall(r"^(\d+ \+ \d+ = \d+)$", reference, re.M))


def test_tokenizer_covers_every_context_and_trace(task, tokenizer):
    rng = random.Random(0)
    for example in pair_unrelated(task.examples("test", 30)):
        for context in TEACHER_CONTEXTS:
            text = render_prompt(tokenizer, example, context=context, sibling=example.solution)
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
        for thinking in (True, False):
            text = task.response(example, "none", thinking, rng)
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_bad_task_options_are_clear_errors():
    with pytest.raises(ValueError, match="privileged_style"):
        build_task("synthetic", {"privileged_style": "loud"})
    with pytest.raises(ValueError, match="unexpected keyword|slip"):
        build_task("synthetic", {"slipp_rate": 0.1})
    with pytest.raises(ValueError, match="unknown task"):
        build_task("chess")


def test_file_task_sft_rows_need_reference_solutions(tmp_path, tokenizer):
    import json

    path = tmp_path / "train.jsonl"
    rows = [{"id": "a", "problem": "What is 1 + 2?", "solution": "1 + 2 = 3", "answer": "3"},
            {"id": "b", "problem": "What is 2 + 2?", "solution": "", "answer": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = build_task("file", {"train": str(path)})
    assert len(task.examples("train", None)) == 2
    assert task.sft_rows(tokenizer, 1)[0]["completion"].startswith("<think>\n1 + 2 = 3\n</think>")
    with pytest.raises(ValueError, match="ids \\['b'\\]"):
        task.sft_rows(tokenizer, None)
