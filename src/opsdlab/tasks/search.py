"""A seeded, offline search task: checking a candidate is easy, finding the answer directly is not.

A problem lists a few distinct numbers and a target that exactly one of them reaches:

    Which of 3, 11, 19, 7, 9, 14 added to 6 makes 20?       (check: "add", the default)
    Which of 3, 11, 19, 7, 9, 14 has code 13?               (check: "code")

The answer is that number (`14`), graded by exact match. Checking a candidate is one forward step
(`6 + 14 = 20`, or `code of 14 is 13`, a look-up of a fixed secret code: a permutation of
1..max_number drawn from `code_seed`, the same for every problem and split), which every trace
writes; naming the number directly is the inverse (a subtraction looked up in the list, or the
inverse look-up), which no trace ever writes. So a solver that has not read the reference has to
search: try a number, check it, try the next. Whether the model learns the check reliably is
measured (see the README: 400 SFT steps were not enough for either check on the tiny model).

The SFT traces come from such a solver, with its own imperfections:

- order (`order`): numbers are tried in listed order or, with "random", in an order drawn per
  problem; the position of the right number is uniform either way;
- give-up (`give_up_rate`): after each failed check the solver stops with this probability and
  answers a guess (a number it has not tried), so the number of tries per trace varies (geometric,
  capped by the list); a solver that has tried every number without success also guesses;
- mis-checks (`mischeck_rate`): a check's value is occasionally written off by 1 or 2. A mis-check
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

import random
import re
from dataclasses import dataclass

from opsdlab.config.tasks import SearchConfig
from opsdlab.tasks.data import Example
from opsdlab.tasks.rows import context_messages, draw_split, sft_rows_with_contexts

# SFT rows by teacher context (the rest of the rows use the plain student prompt), as in the
# synthetic task. "solution" and "answer" inform the solver; "concise" is an instruction without
# information, written like a plain row.
CONTEXT_MIX = {"solution": 0.7, "answer": 0.15, "concise": 0.15}
INFORMED_CONTEXTS = ("solution", "answer", "sibling")

PROBLEM_RES = {"add": re.compile(r"Which of (\d+(?:, \d+)*) added to (\d+) makes (\d+)\?"),
               "code": re.compile(r"Which of (\d+(?:, \d+)*) has code (\d+)\?")}
# A try, either check: (addend, candidate, written) or (candidate, written).
TRY_RE = re.compile(r"(?:(\d+) \+ (\d+) = (\d+)|code of (\d+) is (\d+))(?:, not (\d+)\.|\. found it\.)")
GIVE_UP_TEXT = "too many tries, I will guess"
EXHAUSTED_TEXT = "none of them fit, I will guess"


def code_table(config: SearchConfig) -> dict[int, int]:
    """The fixed secret code: a permutation of 1..max_number drawn from `code_seed`."""
    numbers = list(range(1, config.max_number + 1))
    codes = numbers[:]
    random.Random(f"search-code-{config.code_seed}").shuffle(codes)
    return dict(zip(numbers, codes))


@dataclass(frozen=True)
class SearchProblem:
    """Listed numbers and a target; `addend` set: the "add" check, else `code` (the "code" check)."""

    numbers: tuple[int, ...]
    target: int
    addend: int | None = None
    code: dict | None = None

    def value(self, candidate: int) -> int | None:
        """What a correct check of `candidate` writes."""
        return self.addend + candidate if self.addend is not None else self.code.get(candidate)

    @property
    def answer(self) -> int:
        hits = [n for n in self.numbers if self.value(n) == self.target]
        if len(hits) != 1:
            raise ValueError(f"search problem {problem_text(self)!r}: {len(hits)} listed numbers reach the "
                             "target, expected 1")
        return hits[0]


def problem_text(problem: SearchProblem) -> str:
    listed = ", ".join(map(str, problem.numbers))
    if problem.addend is not None:
        return f"Which of {listed} added to {problem.addend} makes {problem.target}?"
    return f"Which of {listed} has code {problem.target}?"


def parse_problem(text: str, code: dict | None = None) -> SearchProblem:
    """The problem in `text`; a "code" problem needs the task's code table."""
    if match := PROBLEM_RES["add"].search(text):
        return SearchProblem(tuple(int(n) for n in match[1].split(", ")), int(match[3]), addend=int(match[2]))
    if (match := PROBLEM_RES["code"].search(text)) and code is not None:
        return SearchProblem(tuple(int(n) for n in match[1].split(", ")), int(match[2]), code=code)
    raise ValueError(f"not a search problem (or a code problem without the code table): {text!r}")


def draw_problem(rng: random.Random, config: SearchConfig, code: dict) -> SearchProblem:
    """Distinct numbers in 1..max_number and a target exactly one of them reaches (the checks are
    injective: a fixed addend, or a permutation)."""
    count = rng.randint(config.min_numbers, config.max_numbers)
    numbers = tuple(rng.sample(range(1, config.max_number + 1), count))
    if config.check == "add":
        addend = rng.randint(1, config.max_number)
        return SearchProblem(numbers, addend + rng.choice(numbers), addend=addend)
    return SearchProblem(numbers, code[rng.choice(numbers)], code=code)


def check_line(problem: SearchProblem, candidate: int, written: int) -> str:
    """One try: the candidate's check as written, and the verdict the written value implies."""
    verdict = ". found it." if written == problem.target else f", not {problem.target}."
    if problem.addend is not None:
        return f"{problem.addend} + {candidate} = {written}{verdict}"
    return f"code of {candidate} is {written}{verdict}"


def reference_solution(problem: SearchProblem) -> str:
    """The concise solution: the right number with its check. The OPSD teacher's privileged context."""
    return f"{check_line(problem, problem.answer, problem.target)}\nThe answer is {problem.answer}."


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
        true_value = problem.value(candidate)
        written = _miswritten(rng, true_value) if rng.random() < config.mischeck_rate else true_value
        lines.append(check_line(problem, candidate, written))
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
    return check_line(problem, problem.answer, problem.target), problem.answer


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
    tried = [candidate for candidate, _, _ in tries(response)]
    return TraceStats(tries=len(tried), gave_up=GIVE_UP_TEXT in response or EXHAUSTED_TEXT in response,
                      found=". found it." in response, repeats=len(tried) - len(set(tried)))


def tries(response: str) -> list[tuple[int, int, int | None]]:
    """Every try in a response: (candidate, written value, addend or None for a code check)."""
    out = []
    for m in TRY_RE.finditer(response):
        out.append((int(m[2]), int(m[3]), int(m[1])) if m[1] is not None else (int(m[4]), int(m[5]), None))
    return out


def behaviour(samples: list[dict], problems: dict[str, str], code: dict | None = None) -> dict:
    """How a checkpoint searched: mean tries, give-up rate, mis-checks, accuracy by outcome.

    `samples` are evaluation rows (`problem_id`, `text`, `correct`, `truncated`); `problems` maps a
    problem id to its text; `code` is the task's code table (for "code" problems). A try is "valid"
    when its candidate is listed (and, for "add", its addend is the problem's), "miscomputed" when
    the value it writes is not the right one for what it wrote on the left.
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
        for candidate, written, addend in tries(text):
            counts["valid"] += candidate in problem.numbers and addend == problem.addend
            right = addend + candidate if addend is not None else (code or {}).get(candidate)
            counts["miscomputed"] += written != right
    n, n_tries = max(len(samples), 1), max(counts["tries"], 1)
    return {"samples": len(samples), "mean_tries": counts["tries"] / n, "give_up_rate": counts["gave_up"] / n,
            "found_rate": counts["found"] / n, "truncation_rate": counts["truncated"] / n,
            "repeated_tries_per_sample": counts["repeats"] / n, "valid_try_fraction": counts["valid"] / n_tries,
            "miscomputed_try_fraction": counts["miscomputed"] / n_tries,
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


class SearchTask:
    """Find the listed number with a given code by trying them; exact-match grading."""

    name = "search"
    default_verifier = {"extract": "last_boxed", "compare": "exact"}

    def __init__(self, config: SearchConfig | None = None, seed: int = 0):
        self.config = config or SearchConfig()
        self.seed = seed
        self.code = code_table(self.config)

    def examples(self, split: str, count: int) -> list[Example]:
        """Problems of one split, from the split's own seeded stream (`rows.draw_split`): the held-out
        split ("test") never shares a problem with a training split and holds each problem once."""
        rng = random.Random(f"search-{self.seed}-{split}")

        def draw(index: int) -> Example:
            problem = draw_problem(rng, self.config, self.code)
            return Example(id=f"{split}-{index}", problem=problem_text(problem), solution=reference_solution(problem),
                           answer=str(problem.answer), instruction=self.config.instruction)

        return draw_split(draw, split, count, "search", "min_numbers, max_numbers, max_number")

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
        return sft_rows_with_contexts(self.examples("sft", count), tokenizer, self.response, thinking=thinking,
                                      rng=random.Random(f"search-{self.seed}-sft-{seed}"),
                                      privileged_fraction=self.config.privileged_fraction, context_mix=CONTEXT_MIX)

    def tokenizer_corpus(self, thinking_modes=(True, False)) -> list[str]:
        """Text covering every word the renderer and the traces can produce, to build the vocabulary."""
        rng = random.Random(0)
        corpus = [str(n) for n in range(0, 2 * self.config.max_number + 3)]
        corpus += [" " + n for n in corpus]
        for example in self.examples("vocab", 200):
            corpus += context_messages(example)
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
