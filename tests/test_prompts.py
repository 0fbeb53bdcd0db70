import pytest

from opsdlab.tasks.data import Example
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt

EXAMPLE = Example("p1", "What is 2 + 3 + 4?", "2 + 3 = 5\n5 + 4 = 9\nThe answer is 9.", "9",
                  unrelated_solution="6 + 1 = 7\n7 + 8 = 15\nThe answer is 15.")


@pytest.mark.parametrize("context", sorted(set(TEACHER_CONTEXTS) - {"none"}))
@pytest.mark.parametrize("thinking", [True, False])
def test_student_and_teacher_prompts_differ_only_by_the_privileged_block(tokenizer, context, thinking):
    student = render_prompt(tokenizer, EXAMPLE, thinking=thinking)
    teacher = render_prompt(tokenizer, EXAMPLE, thinking=thinking, context=context, sibling="2 + 3 = 5")
    block = TEACHER_CONTEXTS[context](EXAMPLE, "2 + 3 = 5")
    cut = student.index("<|im_end|>")
    assert teacher == student[:cut] + "\n\n" + block + student[cut:]


def test_none_context_is_the_student_prompt(tokenizer):
    assert render_prompt(tokenizer, EXAMPLE, context="none") == render_prompt(tokenizer, EXAMPLE)


def test_sibling_context_falls_back_to_reference_solution(tokenizer):
    assert (render_prompt(tokenizer, EXAMPLE, context="sibling", sibling=None)
            == render_prompt(tokenizer, EXAMPLE, context="solution"))


def test_unknown_context_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="unknown teacher context"):
        render_prompt(tokenizer, EXAMPLE, context="oracle")


@pytest.mark.parametrize("context", ["none", "solution", "answer"])
def test_a_problem_that_ends_with_the_instruction_gets_it_once(tokenizer, context):
    """Benchmark files often append the instruction to the problem; the prompt must not repeat it."""
    from dataclasses import replace

    from opsdlab.tasks.prompts import DEFAULT_INSTRUCTION

    for tail in ("\n" + DEFAULT_INSTRUCTION, " " + DEFAULT_INSTRUCTION + "\n", "\n\n" + DEFAULT_INSTRUCTION):
        with_instruction = replace(EXAMPLE, problem=EXAMPLE.problem + tail)
        prompt = render_prompt(tokenizer, with_instruction, context=context)
        assert prompt.count(DEFAULT_INSTRUCTION) == 1, (tail, prompt)
        if tail == "\n" + DEFAULT_INSTRUCTION:  # the same text as the plain problem's prompt
            assert prompt == render_prompt(tokenizer, EXAMPLE, context=context)
        if context != "none":  # the privileged block still follows the instruction
            block = TEACHER_CONTEXTS[context](EXAMPLE, None)
            assert prompt.index(DEFAULT_INSTRUCTION) < prompt.index(block)


def test_unrelated_and_solution_prompts_differ_only_in_the_solution_text(tokenizer):
    """The control shows another problem's solution with exactly the solution block's wording."""
    unrelated = render_prompt(tokenizer, EXAMPLE, context="unrelated")
    solution = render_prompt(tokenizer, EXAMPLE, context="solution")
    assert unrelated == solution.replace(EXAMPLE.solution, EXAMPLE.unrelated_solution)
    assert EXAMPLE.unrelated_solution in unrelated and EXAMPLE.solution not in unrelated
    assert unrelated.count("reference solution") == solution.count("reference solution") == 2


def test_unrelated_context_without_a_partner_is_an_error_naming_the_example(tokenizer):
    from dataclasses import replace

    with pytest.raises(ValueError, match="'p1' has no unrelated_solution.*pair_unrelated"):
        render_prompt(tokenizer, replace(EXAMPLE, unrelated_solution=None), context="unrelated")


@pytest.mark.parametrize("task_name", ["synthetic", "search"])
def test_a_task_instruction_reaches_every_role(task_name):
    """`task.options.instruction` words the prompt of SFT rows, RLVR/OPSD rollouts, the OPSD teacher
    (rebuilt from a dataset row) and evaluation alike; "" leaves the problem alone."""
    import random

    from opsdlab.tasks.data import DEFAULT_INSTRUCTION
    from opsdlab.modeling.models import build_tiny_tokenizer
    from opsdlab.stages.opsd import _example, opsd_dataset
    from opsdlab.tasks import build_task

    for instruction in ("", "Add them."):
        task = build_task(task_name, {"instruction": instruction})
        tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
        examples = task.examples("train", 2)
        example = examples[0]
        student = render_prompt(tokenizer, example)
        assert DEFAULT_INSTRUCTION not in student
        expected = example.problem + ("\n" + instruction if instruction else "") + "<|im_end|>"
        assert expected in student
        rows = task.sft_rows(tokenizer, 40, thinking=True, seed=0)
        assert all(DEFAULT_INSTRUCTION not in row["prompt"] for row in rows)
        assert any(row["context"] == "solution" for row in rows)
        row = opsd_dataset(examples, tokenizer, True)[0]
        assert row["prompt"] == student
        for context in ("solution", "unrelated", "concise"):
            teacher = render_prompt(tokenizer, _example(row), context=context)
            block = TEACHER_CONTEXTS[context](_example(row), None)
            cut = student.index("<|im_end|>")
            assert teacher == student[:cut] + "\n\n" + block + student[cut:]
    assert build_task(task_name, {}).examples("train", 1)[0].instruction == DEFAULT_INSTRUCTION


@pytest.mark.parametrize("task_name", ["synthetic", "search"])
def test_an_empty_instruction_override_means_none_and_a_number_is_an_error(task_name):
    """`task.options.instruction=` (the shell ate the quotes: YAML null) and `=""` both mean none."""
    from opsdlab.config import load_config
    from opsdlab.tasks import build_task

    for override in ("task.options.instruction=", 'task.options.instruction=""'):
        options = load_config(None, [override]).task.options
        assert build_task(task_name, options).config.instruction == ""
    with pytest.raises(ValueError, match=f"{task_name} task: instruction must be text"):
        build_task(task_name, {"instruction": 3})
