"""A seeded, offline arithmetic task whose reasoning traces carry realistic redundancy and real slips.

A problem asks for the sum of a few small numbers. The SFT traces add them one running total at a
time, written the way long-reasoning models write:

- slips: a running total is occasionally wrong (`slip_rate` per step) and, unless caught, the
  final answer is wrong: the SFT data come from an imperfect solver, which leaves room for RL;
- re-checks ("wait, let me check: 7 + 9 = 16. ok."): recompute a step (`recheck_rate`). Most are
  pure redundancy; one that lands on a slip catches and repairs it ("16, not 15.");
- fillers ("hmm.") per step (`filler_rate`): pure redundancy;
- a restart at the end ("hmm, let me add them again." and the whole chain again, `restart_rate`)
  that repairs any uncaught slip.

Every problem has a concise reference solution (the chain of running totals). The OPSD teacher
is the same model with that solution in its prompt, so the SFT mixture also contains prompts with
a privileged block (`privileged_fraction` of rows). What the data decide, and what they do not:

- Decided by the data (the teacher's *disposition*): a solver who has read the solution copies
  the right totals (no slips) and, in the default `privileged_style="concise"`, hesitates less
  (its redundancy rates are scaled by `privileged_redundancy`). Real reasoning models acquire
  this disposition in pretraining; the tiny model has to get it from here.
  `privileged_style="same"` is the control: privileged traces then have exactly the plain
  redundancy rates, so the context carries information but no stylistic cue.
- Not decided by the data: what OPSD does. No OPSD rollout, gate or divergence appears in the
  data; whether distilling the student toward that teacher on correct, incorrect or all of its
  own rollouts shortens responses, keeps accuracy or damages it is measured, not written here.

With thinking off, the response is the concise chain itself (slips possible, no re-checks),
which is the "short answer" regime of the paper's hypothesis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opsdlab.config.tasks import SyntheticConfig
from opsdlab.tasks.data import Example
from opsdlab.tasks.rows import context_messages, draw_split, sft_rows_with_contexts

# SFT rows by teacher context (the rest of the rows use the plain student prompt). Contexts with
# information make the solver exact; "concise" is an instruction without information.
# The reference solution gets nine rows in ten of the privileged share: reading it is a skill of its
# own (find the step being written in the reference, copy its total), learned only from rows that
# show it, and with the earlier 0.7 the model learned the privileged traces' style but still
# computed its totals itself (README, "The tiny task"). The answer and concise contexts keep a
# small share so that the teacher prompts of those arms are not unseen.
CONTEXT_MIX = {"solution": 0.9, "answer": 0.05, "concise": 0.05}


@dataclass(frozen=True)
class TraceStyle:
    """Per-step probabilities a trace is written with."""
    slip: float
    recheck: float
    filler: float
    restart: float


def make_problem(rng: random.Random, config: SyntheticConfig, index: int, split: str) -> Example:
    count = rng.randint(config.min_terms, config.max_terms)
    terms = [rng.randint(1, config.max_term) for _ in range(count)]
    problem = "What is " + " + ".join(str(t) for t in terms) + "?"
    return Example(id=f"{split}-{index}", problem=problem, solution=reference_solution(terms),
                   answer=str(sum(terms)), instruction=config.instruction)


def terms_of(example: Example) -> list[int]:
    body = example.problem.removeprefix("What is ").removesuffix("?")
    return [int(t) for t in body.split(" + ")]


def reference_solution(terms: list[int]) -> str:
    """The concise chain of running totals: the privileged context."""
    lines, total = [], terms[0]
    for term in terms[1:]:
        lines.append(f"{total} + {term} = {total + term}")
        total += term
    lines.append(f"The answer is {total}.")
    return "\n".join(lines)


def _slipped(rng: random.Random, value: int) -> int:
    wrong = value + rng.choice([-2, -1, 1, 2])
    return wrong if wrong >= 0 else value + 1


def check_line(total: int, term: int, written: int) -> str:
    """A re-check of one step: recompute it; repair the written total when they disagree."""
    true_sum = total + term
    if written == true_sum:
        return f"wait, let me check: {total} + {term} = {true_sum}. ok."
    return f"wait, let me check: {total} + {term} = {true_sum}, not {written}."


def thinking_trace(terms: list[int], style: TraceStyle, rng: random.Random) -> tuple[str, int]:
    """Write a step-by-step trace; return (trace text, the total it ends with)."""
    lines, total = [], terms[0]
    for term in terms[1:]:
        true_sum = total + term
        written = _slipped(rng, true_sum) if rng.random() < style.slip else true_sum
        lines.append(f"{total} + {term} = {written}")
        if rng.random() < style.recheck:
            lines.append(check_line(total, term, written))
            written = true_sum
        if rng.random() < style.filler:
            lines.append("hmm.")
        total = written
    if rng.random() < style.restart:
        lines.append("hmm, let me add them again.")
        redo = terms[0]
        for term in terms[1:]:
            lines.append(f"{redo} + {term} = {redo + term}")
            redo += term
        lines.append(f"so the total is {redo}." if redo == total else f"so the total is {redo}, not {total}.")
        total = redo
    return "\n".join(lines), total


def concise_answer(terms: list[int], slip: float, rng: random.Random) -> tuple[str, int]:
    """The thinking-off response: the chain alone, slips possible, no re-checks."""
    return thinking_trace(terms, TraceStyle(slip=slip, recheck=0.0, filler=0.0, restart=0.0), rng)


def final_line(total: int) -> str:
    return f"The answer is \\boxed{{{total}}}."


class SyntheticTask:
    """Sums of small numbers with verbose, occasionally wrong traces; exact-match grading."""

    name = "synthetic"
    default_verifier = {"extract": "last_boxed", "compare": "exact"}

    def __init__(self, config: SyntheticConfig | None = None, seed: int = 0):
        self.config = config or SyntheticConfig()
        self.seed = seed

    def examples(self, split: str, count: int) -> list[Example]:
        """Problems of one split, from the split's own seeded stream (`rows.draw_split`): the held-out
        split ("test") never shares a problem with a training split and holds each problem once."""
        rng = random.Random(f"{self.seed}-{split}")
        return draw_split(lambda index: make_problem(rng, self.config, index, split), split, count, "synthetic",
                          "min_terms, max_terms, max_term")

    def style(self, context: str) -> TraceStyle:
        c = self.config
        informed = context in ("solution", "answer", "sibling")
        concise = context == "concise" or (informed and c.privileged_style == "concise")
        scale = c.privileged_redundancy if concise else 1.0
        return TraceStyle(slip=0.0 if informed else c.slip_rate, recheck=c.recheck_rate * scale,
                          filler=c.filler_rate * scale, restart=c.restart_rate * scale)

    def response(self, example: Example, context: str, thinking: bool, rng: random.Random) -> str:
        """The SFT target for one prompt, ending at the final answer (EOS is added by the trainer)."""
        terms = terms_of(example)
        style = self.style(context)
        if thinking:
            trace, total = thinking_trace(terms, style, rng)
            return f"<think>\n{trace}\n</think>\n\n{final_line(total)}"
        text, total = concise_answer(terms, style.slip, rng)
        return f"{text}\n{final_line(total)}"

    def sft_rows(self, tokenizer, count: int, thinking: bool = True, seed: int = 0) -> list[dict]:
        """Prompt/completion rows: plain student prompts plus a privileged share, one renderer for all."""
        return sft_rows_with_contexts(self.examples("sft", count), tokenizer, self.response, thinking=thinking,
                                      rng=random.Random(f"{self.seed}-sft-{seed}"),
                                      privileged_fraction=self.config.privileged_fraction, context_mix=CONTEXT_MIX)

    def tokenizer_corpus(self, thinking_modes=(True, False)) -> list[str]:
        """Text covering every word the renderer and the traces can produce, to build the vocabulary."""
        rng = random.Random(0)
        corpus = [str(n) for n in range(0, self.config.max_terms * self.config.max_term + 3)]
        corpus += [" " + n for n in corpus]
        for example in self.examples("vocab", 200):
            corpus += context_messages(example)
            for thinking in thinking_modes:
                for context in ("none", "solution"):
                    corpus.append(self.response(example, context, thinking, rng))
                    style = TraceStyle(slip=1.0, recheck=1.0, filler=1.0, restart=1.0)
                    corpus.append(thinking_trace(terms_of(example), style, rng)[0])
        corpus += ["user", "assistant", "system", "\n\n"]  # role names follow <|im_start|> with no space
        return corpus
