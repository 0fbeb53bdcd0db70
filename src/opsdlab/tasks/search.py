"""A seeded, offline search task: checking a candidate is easy, finding the answer directly is not.

Every number 1..max_number has a fixed secret code (a permutation drawn once from `code_seed`, the
same for every problem and split). A problem lists a few distinct numbers and a code; exactly one
listed number has it:

    Which of 3, 11, 19, 7, 9 has code 12?

The answer is that number (`11`), graded by exact match. Checking a candidate is one forward
look-up (`code of 11 is 12`), which every trace writes and the tiny model learns; naming the number
directly is the inverse look-up, which no trace ever writes (a transformer trained on "code of x is
y" does not thereby learn y -> x: the reversal curse). So a solver that has not read the reference
has to search: try a number, check its code, try the next. (An addition check, `6 + 11 = 17`, was
the first design; the tiny model had not learned the addition table after 400 SFT steps, 77% of its
checks were wrong, so the check was not cheap for it.)

The SFT traces come from such a solver, with its own imperfections:

- order (`order`): numbers are tried in listed order or, with "random", in an order drawn per
  problem; the position of the right number is uniform either way;
- give-up (`give_up_rate`): after each failed check the solver stops with this probability and
  answers a guess (a number it has not tried), so the number of tries per trace varies (geometric,
  capped by the list); a solver that has tried every number without success also guesses;
- mis-checks (`mischeck_rate`): a looked-up code is occasionally written off by 1 or 2. A mis-check
  of the right number rejects it; one that happens to equal the target accepts a wrong number.

Every problem has a concise reference solution (the right number with its check). The OPSD teacher
is the same model with that solution in its prompt, so a share of the SFT rows
(`privileged_fraction`) carry a privileged block; their traces are written by a solver that has
read it: it goes straight to the right number and checks it (one line, no mis-check). Rows with
the "Solve the problem concisely" instruction carry no information, and their traces are drawn from
the plain solver's distribution: the instruction gets no stylistic meaning from these data.

What the data decide, and what they do not:

- Decided: how often the plain solver gives up, mis-checks, and in what order it tries numbers;
  what an informed solver writes.
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

PROBLEM_RE = re.compile(r"Which of (\d+(?:, \d+)*) has code (\d+)\?")
TRY_RE = re.compile(r"code of (\d+) is (\d+)(?:, not (\d+)\.|\. found it\.)")
GIVE_UP_TEXT = "too many tries, I will guess"
EXHAUSTED_TEXT = "none of them fit, I will guess"


@dataclass(frozen=True)
class SearchConfig:
    """Problem sizes and the plain solver's imperfections (see the module docstring)."""

    min_numbers: int = 4
    max_numbers: int = 8
    max_number: int = 19
    give_up_rate: float = 0.25
    mischeck_rate: float = 0.03
    order: str = "listed"
    privileged_fraction: float = 0.5
    code_seed: int = 0

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"search task: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        if not self.max_numbers <= self.max_number <= 99:
            raise ValueError(f"search task: max_number must be in {self.max_numbers}..99 (the listed numbers "
                             f"are distinct), got {self.max_number}")
        for name in ("give_up_rate", "mischeck_rate", "privileged_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"search task: {name} must be in [0, 1], got {value}")
        if self.order not in ORDERS:
            raise ValueError(f"search task: order must be one of {ORDERS}, got {self.order!r}")


def code_table(config: SearchConfig) -> dict[int, int]:
    """The fixed secret code: a permutation of 1..max_number drawn from `code_seed`."""
    numbers = list(range(1, config.max_number + 1))
    codes = numbers[:]
    random.Random(f"search-code-{config.code_seed}").shuffle(codes)
    return dict(zip(numbers, codes))


@dataclass(frozen=True)
class SearchProblem:
    numbers: tuple[int, ...]
    target: int
    code: dict

    @property
    def answer(self) -> int:
        hits = [n for n in self.numbers if self.code[n] == self.target]
        if len(hits) != 1:
            raise ValueError(f"search problem {problem_text(self)}: {len(hits)} listed numbers have the code, "
                             "expected 1")
        return hits[0]


def problem_text(problem: SearchProblem) -> str:
    return f"Which of {', '.join(map(str, problem.numbers))} has code {problem.target}?"


def parse_problem(text: str, code: dict) -> SearchProblem:
    match = PROBLEM_RE.search(text)
    if match is None:
        raise ValueError(f"not a search problem: {text!r}")
    return SearchProblem(tuple(int(n) for n in match[1].split(", ")), int(match[2]), code)


def draw_problem(rng: random.Random, config: SearchConfig, code: dict) -> SearchProblem:
    """Distinct numbers in 1..max_number and the code of one of them (codes are distinct: unique answer)."""
    count = rng.randint(config.min_numbers, config.max_numbers)
    numbers = tuple(rng.sample(range(1, config.max_number + 1), count))
    return SearchProblem(numbers, code[rng.choice(numbers)], code)


def check_line(candidate: int, written: int, target: int) -> str:
    """One try: the candidate's code as written, and the verdict it implies."""
    verdict = ". found it." if written == target else f", not {target}."
    return f"code of {candidate} is {written}{verdict}"


def reference_solution(problem: SearchProblem) -> str:
    """The concise solution: the right number with its check. The OPSD teacher's privileged context."""
    return f"{check_line(problem.answer, problem.target, problem.target)}\nThe answer is {problem.answer}."


def _miswritten(rng: random.Random, value: int) -> int:
    wrong = value + rng.choice([-2, -1, 1, 2])
    return wrong if wrong >= 1 else value + 1


def search_trace(problem: SearchProblem, config: SearchConfig, rng: random.Random) -> tuple[str, int]:
    """The plain solver's trace: try, check, retry, maybe give up; return (trace, answered number)."""
    candidates = list(problem.numbers)
    if config.order == "random":
        rng.shuffle(candidates)
    lines = []
    for index, candidate in enumerate(candidates):
        true_code = problem.code[candidate]
        written = _miswritten(rng, true_code) if rng.random() < config.mischeck_rate else true_code
        lines.append(check_line(candidate, written, problem.target))
        if written == problem.target:
            return "\n".join(lines), candidate
        untried = candidates[index + 1:]
        if untried and rng.random() < config.give_up_rate:
            guess = rng.choice(untried)
            lines.append(f"{GIVE_UP_TEXT} {guess}.")
            return "\n".join(lines), guess
    guess = rng.choice(candidates)
    lines.append(f"{EXHAUSTED_TEXT} {guess}.")
    return "\n".join(lines), guess


def informed_trace(problem: SearchProblem) -> tuple[str, int]:
    """A solver that has read the reference: straight to the right number, checked once."""
    return check_line(problem.answer, problem.target, problem.target), problem.answer


def final_line(answer: int) -> str:
    return f"The answer is \\boxed{{{answer}}}."


@dataclass(frozen=True)
class TraceStats:
    """What a response did: tries written, whether it gave up (or ran out), repeated candidates."""

    tries: int
    gave_up: bool
    found: bool
    repeats: int


def trace_stats(response: str) -> TraceStats:
    """Read a response of this task's format (a model's sample or an SFT target)."""
    tried = [int(m[1]) for m in TRY_RE.finditer(response)]
    return TraceStats(tries=len(tried), gave_up=GIVE_UP_TEXT in response or EXHAUSTED_TEXT in response,
                      found=". found it." in response, repeats=len(tried) - len(set(tried)))


def behaviour(samples: list[dict], problems: dict[str, str], code: dict) -> dict:
    """How a checkpoint searched: mean tries, give-up rate, mis-checks, accuracy by outcome.

    `samples` are evaluation rows (`problem_id`, `text`, `correct`, `truncated`); `problems` maps a
    problem id to its text; `code` is the task's code table. A try is "valid" when its candidate is
    listed, "miscomputed" when the code it writes is not the candidate's code.
    """
    counts = dict.fromkeys(("tries", "gave_up", "found", "truncated", "repeats", "valid", "miscomputed",
                            "correct_found", "correct_gave_up"), 0)
    for sample in samples:
        problem = parse_problem(problems[sample["problem_id"]], code)
        text = sample["text"]
        stats = trace_stats(text)
        found = stats.found and not stats.gave_up
        counts["tries"] += stats.tries
        counts["repeats"] += stats.repeats
        counts["gave_up"] += stats.gave_up
        counts["found"] += found
        counts["truncated"] += bool(sample["truncated"])
        counts["correct_found"] += bool(sample["correct"]) and found
        counts["correct_gave_up"] += bool(sample["correct"]) and stats.gave_up
        for match in TRY_RE.finditer(text):
            candidate, written = int(match[1]), int(match[2])
            counts["valid"] += candidate in problem.numbers
            counts["miscomputed"] += written != code.get(candidate)
    n, tries = max(len(samples), 1), max(counts["tries"], 1)
    return {"samples": len(samples), "mean_tries": counts["tries"] / n, "give_up_rate": counts["gave_up"] / n,
            "found_rate": counts["found"] / n, "truncation_rate": counts["truncated"] / n,
            "repeated_tries_per_sample": counts["repeats"] / n, "valid_try_fraction": counts["valid"] / tries,
            "miscomputed_try_fraction": counts["miscomputed"] / tries,
            "accuracy_when_found": counts["correct_found"] / max(counts["found"], 1),
            "accuracy_when_gave_up": counts["correct_gave_up"] / max(counts["gave_up"], 1)}


def report_behaviour(run_dir: str) -> list[str]:
    """One line per evaluation of a run directory on the search task (see `behaviour`)."""
    import json
    from pathlib import Path

    import yaml

    run = Path(run_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    task = SearchTask(SearchConfig(**config["task"].get("options", {})), seed=config["seed"])
    problems = {e.id: e.problem for e in task.examples("test", config["eval"]["problems"])}
    lines = []
    for path in sorted((run / "eval").glob("*/*/samples.jsonl")):
        samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stats = behaviour(samples, problems, task.code)
        lines.append(f"{path.parent.parent.name}/{path.parent.name}: " +
                     "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return lines


def is_test_problem(problem: str) -> bool:
    """Stable split assignment: about one problem in ten is held out for evaluation."""
    return int(hashlib.sha256(problem.encode()).hexdigest(), 16) % 10 == 0


class SearchTask:
    """Find the listed number with a given code by trying them; exact-match grading."""

    name = "search"
    default_verifier = {"extract": "last_boxed", "compare": "exact"}

    def __init__(self, config: SearchConfig | None = None, seed: int = 0):
        self.config = config or SearchConfig()
        self.seed = seed
        self.code = code_table(self.config)

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
            problem = draw_problem(rng, self.config, self.code)
            text = problem_text(problem)
            if is_test_problem(text) == (split == "test"):
                out.append(Example(id=f"{split}-{index}", problem=text, solution=reference_solution(problem),
                                   answer=str(problem.answer)))
        raise ValueError(f"search task: could not draw {count} {split} problems")

    def response(self, example: Example, context: str, thinking: bool, rng: random.Random) -> str:
        """The SFT target for one prompt, ending at the final answer (EOS is added by the trainer)."""
        problem = parse_problem(example.problem, self.code)
        if context in INFORMED_CONTEXTS:
            trace, answer = informed_trace(problem)
        else:
            trace, answer = search_trace(problem, self.config, rng)
        if thinking:
            return f"<think>\n{trace}\n</think>\n\n{final_line(answer)}"
        return f"{trace}\n{final_line(answer)}"

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
        corpus += [f"{GIVE_UP_TEXT} 1.", f"{EXHAUSTED_TEXT} 1.", "code of 1 is 3. found it.", "code of 1 is 3, not 4."]
        corpus += ["user", "assistant", "system", "\n\n"]  # role names follow <|im_start|> with no space
        return corpus


if __name__ == "__main__":  # python -m opsdlab.tasks.search RUN_DIR: how each checkpoint searched
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m opsdlab.tasks.search RUN_DIR")
    print("\n".join(report_behaviour(sys.argv[1])))
