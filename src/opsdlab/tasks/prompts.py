"""The one prompt renderer used by SFT, RLVR, the OPSD student and teacher, and evaluation.

A prompt is the problem, the task's instruction and, for the OPSD teacher, a privileged block,
rendered through the model's own chat template with the role's thinking switch. Student and teacher
prompts therefore differ only by the privileged block (a test proves it). Teacher contexts are
named choices in `TEACHER_CONTEXTS`; adding one is one function and an entry there and in
`config.choices.CONTEXT_READS` (the field of a problem it shows, which a config checks the name against).

A template that cannot render the asked thinking mode is an error, not a silent switch
(`templates.check_thinking`), and the rendered text never starts with the BOS that the tokenizer
adds itself: every stage tokenizes prompts with special tokens, as TRL does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # a type only: importing transformers here would load it for every problem read
    from transformers import PreTrainedTokenizerBase

from opsdlab.tasks.data import DEFAULT_INSTRUCTION, Example  # noqa: F401  (DEFAULT_INSTRUCTION re-exported)
from opsdlab.tasks.templates import check_thinking, strip_bos


def _solution_context(example: Example, sibling: str | None) -> str:
    return (
        "Here is a reference solution:\n" + example.solution.strip() + "\n"
        "After reading the reference solution, solve the problem again in your own way."
    )


def _answer_context(example: Example, sibling: str | None) -> str:
    return f"The final answer is {example.answer}.\nSolve the problem in your own way."


def _sibling_context(example: Example, sibling: str | None) -> str:
    # Falls back to the reference solution when the group had no correct rollout to show, which is
    # always the case with one rollout per prompt.
    if sibling is None:
        return _solution_context(example, None)
    return (
        "Here is a reference solution:\n" + sibling.strip() + "\n"
        "After reading the reference solution, solve the problem again in your own way."
    )


def _unrelated_context(example: Example, sibling: str | None) -> str:
    # The solution block's exact wording around another problem's solution (`data.pair_unrelated`):
    # a hint's style and length without its information.
    if example.unrelated_solution is None:
        raise ValueError(f"teacher context 'unrelated': example {example.id!r} has no unrelated_solution; "
                         "pair the examples first (data.pair_unrelated)")
    return _solution_context(replace(example, solution=example.unrelated_solution), None)


def _concise_context(example: Example, sibling: str | None) -> str:
    return "Solve the problem concisely."


def _no_context(example: Example, sibling: str | None) -> None:
    return None


# name -> privileged block builder (None: the teacher reads the student prompt itself).
# "unrelated", "concise" and "none" carry no privileged information: they are the controls.
TEACHER_CONTEXTS: dict[str, Callable[[Example, str | None], str | None]] = {
    "solution": _solution_context,
    "answer": _answer_context,
    "sibling": _sibling_context,
    "unrelated": _unrelated_context,
    "concise": _concise_context,
    "none": _no_context,
}


# The controls: no teacher check expects them to be more accurate than the student prompt.
CONTROL_CONTEXTS = ("unrelated", "concise", "none")

def _ends_with(text: str, suffix: str) -> bool:
    """Whether `text` ends with `suffix`, ignoring differences in whitespace."""
    return " ".join(text.split()).endswith(" ".join(suffix.split()))


def user_message(example: Example, context: str | None = None) -> str:
    """The user turn: problem, the example's instruction, then the privileged block if any.

    A problem that already ends with the instruction (as in many public benchmark files) keeps it
    once: the instruction is not appended again.
    """
    text = example.problem.strip()
    if example.instruction and not _ends_with(text, example.instruction):
        text += "\n" + example.instruction
    if context:
        text += "\n\n" + context
    return text


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    thinking: bool = True,
    context: str = "none",
    sibling: str | None = None,
) -> str:
    """Render the generation prompt for one role as text through the tokenizer's chat template.

    `context` names an entry of TEACHER_CONTEXTS; "none" is the student prompt. The
    example's `instruction` follows the problem in every role alike. Raises
    `templates.ThinkingSwitchError` when the template always renders the other thinking mode. The
    text is meant to be tokenized with special tokens: a leading BOS that the tokenizer adds
    anyway is left out.
    """
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"unknown teacher context {context!r}; choose one of {sorted(TEACHER_CONTEXTS)}")
    check_thinking(tokenizer, thinking, role="student prompt" if context == "none" else f"teacher prompt ({context})")
    block = TEACHER_CONTEXTS[context](example, sibling)
    messages = [{"role": "user", "content": user_message(example, block)}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    return strip_bos(tokenizer, text)
