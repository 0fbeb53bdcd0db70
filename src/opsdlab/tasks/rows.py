"""What every generated task shares: how a split's problems are drawn, SFT rows with a privileged
share and the prompt text of every teacher context for the tiny vocabulary (the checks of their
options: `config.tasks`).

A task supplies `response(example, context, thinking, rng)`, the SFT target a solver writes after
reading the prompt of one role; these functions render the prompts through the one renderer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from opsdlab.tasks.data import Example, problem_key
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt, user_message
from opsdlab.tasks.templates import completion_for_prompt


# The split that holds a task's held-out problems: evaluation sets and check problems come from it.
HELD_OUT = "test"


def is_test_problem(problem: str) -> bool:
    """Stable split assignment: about one problem in ten (by a hash of its text) is held out for evaluation."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 10 == 0


def draw_split(draw: Callable[[int], Example], split: str, count: int, task: str, space: str) -> list[Example]:
    """The first `count` problems of `split` in a seeded stream of draws (`draw(index)`, the index-th
    draw of the split's own stream).

    A problem belongs to the held-out split iff `is_test_problem` says so, so no training split holds
    a held-out problem. The held-out split holds each problem once (by `problem_key`; a repeated draw
    is skipped): the evaluated problems are distinct, and the check problems after them in the same
    stream are others. Training splits keep repeats: they sample the task's distribution. `task` and
    `space` (the options that size the problem space) name them in the error when too few problems exist.
    """
    held_out = split == HELD_OUT
    out, seen = [], set()
    for index in range(1000 * count + 1000):
        if len(out) == count:
            return out
        example = draw(index)
        if is_test_problem(example.problem) != held_out:
            continue
        if held_out:
            key = problem_key(example.problem)
            if key in seen:
                continue
            seen.add(key)
        out.append(example)
    raise ValueError(f"{task} task: could not draw {count} {'distinct ' if held_out else ''}{split} problems; the "
                     f"problem space ({space}) is too small for that many: widen it, or ask for fewer")


def sft_rows_with_contexts(examples: list[Example], tokenizer, response: Callable, *, thinking: bool,
                           rng: random.Random, privileged_fraction: float, context_mix: dict[str, float]
                           ) -> list[dict]:
    """Prompt/completion rows: the student prompt, or with probability `privileged_fraction` a
    teacher prompt whose context is drawn from `context_mix` (name -> weight), so the model learns
    to read a privileged block as a pretrained model already does."""
    contexts, weights = list(context_mix), list(context_mix.values())
    rows = []
    for example in examples:
        context = "none"
        if rng.random() < privileged_fraction:
            context = rng.choices(contexts, weights)[0]
        prompt = render_prompt(tokenizer, example, thinking=thinking, context=context)
        # A template that opens <think> itself gets the trace without its own opening.
        completion = completion_for_prompt(prompt, response(example, context, thinking, rng))
        rows.append({"prompt": prompt, "completion": completion + tokenizer.eos_token, "context": context})
    return rows


def context_messages(example: Example) -> list[str]:
    """The user turn of `example` under every teacher context, for a tokenizer corpus. `unrelated`
    is left out: it repeats the solution block's words, and more text would reorder the
    frequency-ranked vocabulary of the tiny model."""
    return [user_message(example, context=TEACHER_CONTEXTS[name](example, example.solution))
            for name in TEACHER_CONTEXTS if name != "unrelated"]
