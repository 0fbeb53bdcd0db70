"""The steps of a `budget` arm, which trains nothing: its starting checkpoint's response lengths
measured on training problems (when its budgets are quantiles of them), and the evaluations of that
checkpoint with each response cut at a budget (budget forcing).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy

from opsdlab.config import ConfigError
from opsdlab.evaluation.evaluate import load_for_eval, read_samples, write_eval
from opsdlab.modeling.runtime import is_main_process, main_decides, wait_for_everyone
from opsdlab.run.eval_steps import evaluate_checkpoint, evaluate_sharded, shared_budgets
from opsdlab.run.plan import Run, Step, arm_settings, budget_lengths_folder, budget_points, lengths_problems
from opsdlab.run.provenance import write_record
from opsdlab.run.rundir import log


def _measure_budget_lengths(run: Run, step: Step) -> None:
    """A budget arm's lengths: the starting checkpoint sampled as the evaluation samples (eval.sampling)
    on training problems, written to budget/<arm>/. A budget set on the problems it is then scored on
    would fit them; training problems are what every other arm learns from."""
    config, out = run.config, budget_lengths_folder(run.run_dir, step.arm)
    if main_decides(lambda: (out / "summary.json").exists()):
        return
    examples = run.task.examples("train", lengths_problems(config, step.arm))
    model, tokenizer = load_for_eval(step.model_dir, config.eval.backend, config.eval.dtype or config.model.dtype,
                                     config.model.trust_remote_code, config.eval.vllm, config.seed)
    start = time.time()
    samples, summary = evaluate_sharded(model, tokenizer, examples, run.verifier, config.eval.sampling,
                                        backend=config.eval.backend, thinking=config.task.thinking,
                                        desc=f"lengths {step.source} for {step.arm}", **shared_budgets(config))
    if is_main_process():
        summary.update(checkpoint=step.source, problems="train")
        write_record(out, run.outputs[out].expected())
        write_eval(out, samples, summary)
        budgets = ", ".join(f"{label} {budget_tokens(run.run_dir, replace(step, budget=point))}"
                            for label, point in budget_points(arm_settings(config, step.arm)))
        log(run.run_dir, f"[budget] {step.arm}: budgets {budgets} tokens, quantiles of {step.source}'s "
                         f"{len(samples)} response lengths on {len(examples)} training problems",
            kind="eval", checkpoint=step.source, set="train", seconds=round(time.time() - start, 1))
    wait_for_everyone()


def budget_tokens(run_dir: Path, step: Step) -> int:
    """The token budget of a budget-forcing evaluation: given, or the quantile of the starting
    checkpoint's sampled response lengths on training problems (`_measure_budget_lengths`), one
    budget for every evaluation set."""
    kind, value = step.budget
    if kind == "tokens":
        return int(value)
    samples = budget_lengths_folder(run_dir, step.arm) / "samples.jsonl"
    if not samples.exists():
        raise ConfigError(f"arms.{step.arm}: budget_quantiles read the lengths of {step.source} on training problems "
                          f"({samples}), which were not measured; give budgets in tokens (budgets=[...]) instead")
    lengths = [sample.response_tokens for sample in read_samples(samples)]
    return max(1, round(float(numpy.quantile(lengths, value))))


def budget_source(run_dir: Path, step: Step) -> str:
    """Where a budget evaluation's budget came from, in words, for its summary and log line."""
    kind, value = step.budget
    if kind == "tokens":
        return "given in tokens (budgets)"
    samples = read_samples(budget_lengths_folder(run_dir, step.arm) / "samples.jsonl")
    problems = len({sample.problem_id for sample in samples})
    return (f"the {value} quantile of {step.source}'s {len(samples)} response lengths on {problems} training "
            f"problems in {budget_lengths_folder(run_dir, step.arm).relative_to(run_dir)}")


def _evaluate_budget(run: Run, step: Step) -> None:
    """A `budget` arm's evaluation: its starting checkpoint with each response cut at the budget."""
    arm = arm_settings(run.config, step.arm)
    budget = budget_tokens(run.run_dir, step)
    evaluate_checkpoint(run.run_dir, step.checkpoint, Path(step.model_dir), run.config, run.task, run.sets,
                        outputs=run.outputs, budgets={name: budget for name in run.sets},
                        answer_tokens=arm.budget_answer_tokens,
                        notes={"budget_from": budget_source(run.run_dir, step)})
