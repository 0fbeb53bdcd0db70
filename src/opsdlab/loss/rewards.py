"""Rewards for RLVR, built on the one verifier; they also report rollout statistics.

`VerifierReward` is a TRL reward function: 1.0 for a response whose final answer the verifier
accepts, else 0.0. Besides the reward it logs, per generation batch, rollout accuracy, the mean
length of correct and incorrect rollouts and the truncation rate, and it keeps the last batch's
per-rollout correctness so that the OPSD gate reuses the same grading instead of redoing it.

`LengthAwareReward` is the same verifier reward made length-aware for the `length_rl` method: one
of `LENGTH_REWARDS` turns (correct, length, target length, truncated) into the reward.
"""

from __future__ import annotations

from opsdlab.tasks.templates import is_well_formed
from opsdlab.tasks.verifier import VerifierConfig, grade


class VerifierReward:
    """Binary correctness reward from the project's verifier."""

    __name__ = "correct"

    def __init__(self, verifier: VerifierConfig, eos_token_ids: set[int]):
        self.verifier = verifier
        self.eos_token_ids = set(eos_token_ids)
        self.last_correct: list[bool] = []
        self.last_truncated: list[bool] = []

    def __call__(self, prompts, completions, completion_ids, answer, log_metric=None, **_) -> list[float]:
        correct = grade(list(completions), [str(a) for a in answer], self.verifier)
        truncated = [not ids or ids[-1] not in self.eos_token_ids for ids in completion_ids]
        self.last_correct, self.last_truncated = correct, truncated
        if log_metric is not None:
            for name, value in rollout_stats(correct, truncated, [len(ids) for ids in completion_ids]).items():
                log_metric(name, value)
        return [1.0 if ok else 0.0 for ok in correct]


def truncation_reward(correct: bool, length: int, target: int, truncated: bool) -> float:
    """DLER's truncation penalty (arXiv 2510.15110): 1.0 if correct and length <= target, else 0.0.

    A correct response longer than the target earns nothing, as if it had been cut at the target
    before its answer; `truncated` (no end token within max_completion_length) does not enter.
    """
    return 1.0 if correct and length <= target else 0.0


# Named length-aware rewards, each a pure function (correct, length, target, truncated) -> reward.
LENGTH_REWARDS = {"truncation": truncation_reward}


class LengthAwareReward(VerifierReward):
    """The verifier's correctness made length-aware: `LENGTH_REWARDS[name]` of each rollout.

    A `VerifierReward` still (the rollout statistics are logged and `last_correct` /
    `last_truncated` kept, graded once). The length is the response's tokens without its closing
    end token, as evaluation counts it (`evaluate.response_length`). It also logs
    `rollouts/correct_over_target`: the fraction of correct rollouts longer than the target (the
    correct answers the penalty takes away), left out of batches with no correct rollout.
    """

    def __init__(self, verifier: VerifierConfig, eos_token_ids: set[int], name: str, target: int):
        if name not in LENGTH_REWARDS:
            raise ValueError(f"length_reward must be one of {sorted(LENGTH_REWARDS)}, got {name!r}")
        if target < 1:
            raise ValueError(f"length target must be a positive number of tokens, got {target}")
        super().__init__(verifier, eos_token_ids)
        self.__name__ = f"correct_{name}"
        self.reward = LENGTH_REWARDS[name]
        self.target = int(target)

    def __call__(self, prompts, completions, completion_ids, answer, log_metric=None, **kwargs) -> list[float]:
        super().__call__(prompts, completions, completion_ids, answer, log_metric=log_metric, **kwargs)
        lengths = [len(ids) - (1 if ids and ids[-1] in self.eos_token_ids else 0) for ids in completion_ids]
        rows = list(zip(self.last_correct, lengths, self.last_truncated))
        if log_metric is not None:
            over = [n > self.target for ok, n, _ in rows if ok]
            if over:
                log_metric("rollouts/correct_over_target", sum(over) / len(over))
        return [float(self.reward(bool(ok), n, self.target, bool(cut))) for ok, n, cut in rows]


def rollout_stats(correct: list[bool], truncated: list[bool], lengths: list[int]) -> dict[str, float]:
    """Accuracy, truncation rate and mean length overall / of correct / of incorrect rollouts.

    A length split with no rollouts in it is left out rather than reported as 0.
    """
    stats = {
        "rollouts/accuracy": sum(correct) / len(correct),
        "rollouts/truncation_rate": sum(truncated) / len(truncated),
        "rollouts/mean_length": sum(lengths) / len(lengths),
    }
    good = [n for n, ok in zip(lengths, correct) if ok]
    bad = [n for n, ok in zip(lengths, correct) if not ok]
    if good:
        stats["rollouts/mean_length_correct"] = sum(good) / len(good)
    if bad:
        stats["rollouts/mean_length_incorrect"] = sum(bad) / len(bad)
    return stats


def format_reward(completions, prompts=None, **_) -> list[float]:
    """1.0 when the response closes its think block (if one is open) and boxes a final answer after it.

    TRL passes the rendered `prompts`: with a template that opens the think block itself (DeepSeek-R1
    distill, Qwen3.5 thinking) the response starts inside it, and must close it to score.
    """
    prompts = list(prompts) if prompts is not None else [""] * len(completions)
    return [1.0 if is_well_formed(text, prompt) else 0.0 for text, prompt in zip(completions, prompts)]
