"""What every generated task shares: SFT rows with a privileged share and the prompt text of every
teacher context for the tiny vocabulary (the checks of their options: `config.tasks`).

A task supplies `response(example, context, thinking, rng)`, the SFT target a solver writes after
reading the prompt of one role; these functions render the prompts through the one renderer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from opsdlab.tasks.data import Example
from opsdlab.tasks.prompts import TEACHER_CONTEXTS, render_prompt, user_message
from opsdlab.tasks.templates import completion_for_prompt


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
