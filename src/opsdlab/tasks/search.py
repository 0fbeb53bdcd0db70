"""A seeded, offline search task: checking a candidate is easy, finding the answer directly is not.

A problem lists a few distinct numbers and a target that exactly one pair of them adds up to:

    Which two of 4, 17, 9, 12, 6 add up to 21?

The answer is that pair, written in the order the numbers are listed (`9 + 12`), graded by exact
match. Checking a candidate pair is one addition, which the tiny model sees thousands of times and
learns reliably; naming the pair directly means relating the target to every pair at once, which
the data never show a solver doing without the reference. So a solver that has not read the
reference has to search: try a pair, check it, try the next.

The SFT traces come from such a solver, with its own imperfections:

- order (`order`): the pairs are tried in listed order, (1st, 2nd), (1st, 3rd), ..., or in a random
  order drawn per problem ("random"); the position of the right pair is uniform either way;
- give-up (`give_up_rate`): after each failed check the solver stops with this probability and
  answers a guess (a pair it has not tried), so the number of tries per trace varies, geometric
  with a cap at the number of pairs; a solver that has tried every pair without success also guesses;
- mis-checks (`mischeck_rate`): a check's sum is occasionally written off by 1 or 2. A mis-check of
  the right pair rejects it; a mis-check that happens to equal the target accepts a wrong pair.

Every problem has a concise reference solution (the right pair with its check). The OPSD teacher is
the same model with that solution in its prompt, so a share of the SFT rows (`privileged_fraction`)
carry a privileged block; their traces are written by a solver that has read it: it goes straight
to the right pair and checks it (one line, no mis-check). Rows with the "Solve the problem
concisely" instruction carry no information, and their traces are drawn from the plain solver's
distribution: the instruction gets no stylistic meaning from these data.

What the data decide, and what they do not:

- Decided: how often the plain solver gives up, mis-checks, and in what order it tries pairs; what
  an informed solver writes.
- Not decided: what RL or OPSD does. Nothing in the data depends on a reward, a length target, an
  OPSD gate or divergence. Whether RL learns to give up less (longer traces, more accuracy), and
  what distilling toward the informed teacher then does to length and accuracy, is measured.

With thinking off the response is the same search without the think block.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from opsdlab.data import Example
from opsdlab.prompts import render_prompt
from opsdlab.templates import completion_for_prompt

ORDERS = ("listed", "random")

# SFT rows by teacher context (the rest of the rows use the plain student prompt), as in the
# synthetic task. "solution" and "answer" inform the solver; "concise" is an instruction without
# information, written like a plain row.
CONTEXT_MIX = {"solution": 0.7, "answer": 0.15, "concise": 0.15}
INFORMED_CONTEXTS = ("solution", "answer", "sibling")

PROBLEM_RE = re.compile(r"Which two of (\d+(?:, \d+)*) add up to (\d+)\?")
TRY_RE = re.compile(r"(\d+) \+ (\d+) = (\d+)(?:, not (\d+)\.|\. found it\.)")
GIVE_UP_TEXT = "too many tries, I will guess"
EXHAUSTED_TEXT = "none of them fit, I will guess"


@dataclass(frozen=True)
class SearchConfig:
    """Problem sizes and the plain solver's imperfections (see the module docstring)."""

    min_numbers: int = 4
    max_numbers: int = 6
    max_number: int = 19
    give_up_rate: float = 0.2
    mischeck_rate: float = 0.03
    order: str = "listed"
    privileged_fraction: float = 0.5

    def __post_init__(self):
        if not 3 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"search task: need 3 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        # A list of n distinct numbers with one unique pair sum needs enough room to draw from.
        if not 2 * self.max_numbers <= self.max_number <= 99:
            raise ValueError(f"search task: max_number must be in {2 * self.max_numbers}..99 (at least twice "
                             f"max_numbers, so that lists with a unique pair exist), got {self.max_number}")
        for name in ("give_up_rate", "mischeck_rate", "privileged_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"search task: {name} must be in [0, 1], got {value}")
        if self.order not in ORDERS:
            raise ValueError(f"search task: order must be one of {ORDERS}, got {self.order!r}")


@dataclass(frozen=True)
class SearchProblem:
    numbers: tuple[int, ...]
    target: int

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Every pair, each written in listed order, in listed order."""
        n = self.numbers
        return [(n[i], n[j]) for i in range(len(n)) for j in range(i + 1, len(n))]

    @property
    def answer_pair(self) -> tuple[int, int]:
        hits = [p for p in self.pairs if sum(p) == self.target]
        if len(hits) != 1:
            raise ValueError(f"search problem {self}: {len(hits)} pairs add up to the target, expected 1")
        return hits[0]


def pair_text(pair: tuple[int, int]) -> str:
    return f"{pair[0]} + {pair[1]}"


def problem_text(problem: SearchProblem) -> str:
    return f"Which two of {', '.join(map(str, problem.numbers))} add up to {problem.target}?"


def parse_problem(text: str) -> SearchProblem:
    match = PROBLEM_RE.search(text)
    if match is None:
        raise ValueError(f"not a search problem: {text!r}")
    return SearchProblem(tuple(int(n) for n in match[1].split(", ")), int(match[2]))


def draw_problem(rng: random.Random, config: SearchConfig) -> SearchProblem:
    """Distinct numbers in 1..max_number and a target that exactly one pair reaches."""
    while True:
        count = rng.randint(config.min_numbers, config.max_numbers)
        numbers = tuple(rng.sample(range(1, config.max_number + 1), count))
        i, j = sorted(rng.sample(range(count), 2))
        problem = SearchProblem(numbers, numbers[i] + numbers[j])
        if sum(1 for p in problem.pairs if sum(p) == problem.target) == 1:
            return problem


def check_line(pair: tuple[int, int], written: int, target: int) -> str:
    """One try: the pair, the sum as written, and the verdict the written sum implies."""
    verdict = ". found it." if written == target else f", not {target}."
    return f"{pair_text(pair)} = {written}{verdict}"


def reference_solution(problem: SearchProblem) -> str:
    """The concise solution: the right pair with its check. The OPSD teacher's privileged context."""
    pair = problem.answer_pair
    return f"{check_line(pair, sum(pair), problem.target)}\nThe answer is {pair_text(pair)}."


def _misadded(rng: random.Random, value: int) -> int:
    wrong = value + rng.choice([-2, -1, 1, 2])
    return wrong if wrong >= 1 else value + 1


def search_trace(problem: SearchProblem, config: SearchConfig, rng: random.Random) -> tuple[str, tuple[int, int]]:
    """The plain solver's trace: try, check, retry, maybe give up; return (trace, answered pair)."""
    pairs = problem.pairs
    if config.order == "random":
        rng.shuffle(pairs)
    lines = []
    for index, pair in enumerate(pairs):
        true_sum = sum(pair)
        written = _misadded(rng, true_sum) if rng.random() < config.mischeck_rate else true_sum
        lines.append(check_line(pair, written, problem.target))
        if written == problem.target:
            return "\n".join(lines), pair
        untried = pairs[index + 1:]
        if untried and rng.random() < config.give_up_rate:
            guess = rng.choice(untried)
            lines.append(f"{GIVE_UP_TEXT} {pair_text(guess)}.")
            return "\n".join(lines), guess
    guess = rng.choice(pairs)
    lines.append(f"{EXHAUSTED_TEXT} {pair_text(guess)}.")
    return "\n".join(lines), guess


def informed_trace(problem: SearchProblem) -> tuple[str, tuple[int, int]]:
    """A solver that has read the reference: straight to the right pair, checked once."""
    pair = problem.answer_pair
    return check_line(pair, sum(pair), problem.target), pair


def final_line(pair: tuple[int, int]) -> str:
    return f"The answer is \\boxed{{{pair_text(pair)}}}."


@dataclass(frozen=True)
class TraceStats:
    """What a response did: tries written, whether it gave up (or ran out of pairs), repeated tries."""

    tries: int
    gave_up: bool
    found: bool
    repeats: int


def trace_stats(response: str) -> TraceStats:
    """Read a response of this task's format (a model's sample or an SFT target)."""
    tried = [(int(m[1]), int(m[2])) for m in TRY_RE.finditer(response)]
    return TraceStats(tries=len(tried), gave_up=GIVE_UP_TEXT in response or EXHAUSTED_TEXT in response,
                      found=". found it." in response, repeats=len(tried) - len(set(tried)))


def is_test_problem(problem: str) -> bool:
    """Stable split assignment: about one problem in ten is held out for evaluation."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 10 == 0


class SearchTask:
    """Find the pair that adds up to a target by trying pairs; exact-match grading of the pair."""

    name = "search"
    default_verifier = {"extract": "last_boxed", "compare": "exact"}

    def __init__(self, config: SearchConfig | None = None, seed: int = 0):
        self.config = config or SearchConfig()
        self.seed = seed

    def examples(self, split: str, count: int) -> list[Example]:
        """Problems of one split, from the split's own seeded stream.

        A problem belongs to the test split iff a stable hash of its text falls in the test bucket
        (about 1 in 10), so held-out problems never appear in any training split.
        """
        rng = random.Random(f"search-{self.seed}-{split}")
        out = []
        for index in range(1000 * count + 1000):
            if len(out) == count:
                return out
            problem = draw_problem(rng, self.config)
            text = problem_text(problem)
            if is_test_problem(text) == (split == "test"):
                out.append(Example(id=f"{split}-{index}", problem=text, solution=reference_solution(problem),
                                   answer=pair_text(problem.answer_pair)))
        raise ValueError(f"search task: could not draw {count} {split} problems")

    def response(self, example: Example, context: str, thinking: bool, rng: random.Random) -> str:
        """The SFT target for one prompt, ending at the final answer (EOS is added by the trainer)."""
        problem = parse_problem(example.problem)
        if context in INFORMED_CONTEXTS:
            trace, pair = informed_trace(problem)
        else:
            trace, pair = search_trace(problem, self.config, rng)
        if thinking:
            return f"<think>\n{trace}\n</think>\n\n{final_line(pair)}"
        return f"{trace}\n{final_line(pair)}"

    def sft_rows(self, tokenizer, count: int, thinking: bool = True, seed: int = 0) -> list[dict]:
        """Prompt/completion rows: plain student prompts plus a privileged share, one renderer for all."""
        rng = random.Random(f"search-{self.seed}-sft-{seed}")
        contexts, weights = list(CONTEXT_MIX), list(CONTEXT_MIX.values())
        rows = []
        for example in self.examples("sft", count):
            context = "none"
            if rng.random() < self.config.privileged_fraction:
                context = rng.choices(contexts, weights)[0]
            prompt = render_prompt(tokenizer, example, thinking=thinking, context=context)
            # A template that opens <think> itself gets the trace without its own opening.
            completion = completion_for_prompt(prompt, self.response(example, context, thinking, rng))
            rows.append({"prompt": prompt, "completion": completion + tokenizer.eos_token, "context": context})
        return rows

    def tokenizer_corpus(self, thinking_modes=(True, False)) -> list[str]:
        """Text covering every word the renderer and the traces can produce, to build the vocabulary."""
        from opsdlab.prompts import TEACHER_CONTEXTS, user_message

        rng = random.Random(0)
        corpus = [str(n) for n in range(0, 2 * self.config.max_number + 3)]
        corpus += [" " + n for n in corpus]
        for example in self.examples("vocab", 200):
            for context in TEACHER_CONTEXTS:
                block = TEACHER_CONTEXTS[context](example, example.solution)
                corpus.append(user_message(example, context=block))
            for thinking in thinking_modes:
                for context in ("none", "solution"):
                    corpus.append(self.response(example, context, thinking, rng))
        corpus += [f"{GIVE_UP_TEXT} 1 + 2.", f"{EXHAUSTED_TEXT} 1 + 2.", "1 + 2 = 3. found it.",
                   "1 + 2 = 3, not 4."]
        corpus += ["user", "assistant", "system", "\n\n"]  # role names follow <|im_start|> with no space
        return corpus
