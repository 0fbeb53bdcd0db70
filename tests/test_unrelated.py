"""The `unrelated` teacher control: each example is paired with another problem's solution."""

import random

import pytest
from opsd_helpers import make_trainer, record_teacher_prompts

from opsdlab.tasks.data import Example, pair_unrelated


def _example(name: str, lines: int, answer: str) -> Example:
    return Example(name, f"problem {name}", "\n".join(f"{name} line {i}" for i in range(lines)), answer)


def test_pairing_hand_checked():
    """Different answer first, then the nearest line count (fewer lines on a tie), then list order."""
    a, b, c = _example("a", 3, "9"), _example("b", 3, "9"), _example("c", 3, "12")
    d, e, f = _example("d", 2, "5"), _example("e", 5, "20"), _example("f", 4, "7")
    paired = pair_unrelated([a, b, c, d, e, f])
    partners = {x.id: next(y.id for y in (a, b, c, d, e, f) if y.solution == x.unrelated_solution) for x in paired}
    # a and b share answer 9, so each takes c; c cycles back to a; d (2 lines) and f (4 lines: 3 and 5
    # are equally near, 3 is fewer) take the 3-line bucket from their place, cycling to a; e (5) takes f (4).
    assert partners == {"a": "c", "b": "c", "c": "a", "d": "a", "e": "f", "f": "a"}
    assert [x.solution for x in paired] == [x.solution for x in (a, b, c, d, e, f)]  # nothing else changes


def test_pairing_uses_the_same_answer_only_when_unavoidable_and_never_itself():
    x, y = _example("x", 2, "1"), _example("y", 2, "1")
    assert [p.unrelated_solution for p in pair_unrelated([x, y])] == [y.solution, x.solution]
    assert pair_unrelated([x]) == [x]  # nobody to pair with: left unset, the context then raises
    kept = Example("k", "p", "s", "1", unrelated_solution="given")
    assert pair_unrelated([kept, x])[0].unrelated_solution == "given"


def _brute_force_partner(examples, i):
    """The rule of `pair_unrelated`'s docstring, as a minimum over every other example."""
    def lines(e):
        return len(e.solution.strip().splitlines())
    n = len(examples)
    return min((examples[j].answer == examples[i].answer, abs(lines(examples[j]) - lines(examples[i])),
                lines(examples[j]), (j - i) % n, j) for j in range(n) if j != i)[-1]


@pytest.mark.parametrize("seed", range(5))
def test_pairing_is_deterministic_and_follows_its_rule(seed):
    rng = random.Random(seed)
    examples = [_example(f"e{i}", rng.randint(1, 4), str(rng.randint(1, 3))) for i in range(rng.randint(2, 30))]
    paired = pair_unrelated(examples)
    assert paired == pair_unrelated(examples)
    for i, example in enumerate(paired):
        j = _brute_force_partner(examples, i)
        assert j != i and example.unrelated_solution == examples[j].solution


def test_an_opsd_step_with_the_unrelated_teacher_reads_another_problems_solution(tmp_path, tiny_folder, task):
    from dataclasses import replace

    from opsdlab.stages.opsd import _example as example_of_row
    from opsdlab.tasks.prompts import render_prompt

    trainer = make_trainer(tmp_path, tiny_folder, task, max_steps=1, teacher_context="unrelated", gate="all")
    teacher_rows = record_teacher_prompts(trainer)
    trainer.train()
    assert trainer.state.global_step == 1 and teacher_rows
    tokenizer = trainer.processing_class
    solutions = set(trainer.train_dataset["solution"])
    for row, ids in teacher_rows:
        text = tokenizer.decode(ids)
        assert row["unrelated_solution"] in solutions and row["unrelated_solution"] != row["solution"]
        assert row["unrelated_solution"].strip() in text and row["solution"].strip() not in text
        shown = replace(example_of_row(row), solution=row["unrelated_solution"])  # the solution prompt, other text
        assert ids == tokenizer(render_prompt(tokenizer, shown, context="solution"))["input_ids"]
