"""What runs a step: the `Run` every step reads, built from the config by each process (`open_run`),
and the function of each kind of step (`STEP_KINDS`), looked up by the single-process loop of
`pipeline.run_pipeline` and by a worker process (`workers`) alike.
"""

from __future__ import annotations

from opsdlab.config import PipelineConfig
from opsdlab.run.budget_steps import _evaluate_budget, _measure_budget_lengths
from opsdlab.run.eval_steps import _check_teacher, _evaluate
from opsdlab.run.outputs import run_outputs
from opsdlab.run.plan import Run
from opsdlab.run.problems import eval_sets, verifier_of
from opsdlab.run.train_steps import _train_arm, _train_rlvr, _train_sft
from opsdlab.tasks import build_task


def open_run(config: PipelineConfig) -> Run:
    """The task, evaluation sets and verifier of a run, built from its config (cheap; each process builds its own)."""
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    outputs = {output.folder: output for output in run_outputs(config)}
    return Run(config, task, eval_sets(config, task), verifier_of(config, task), outputs)


STEP_KINDS = {
    "sft": _train_sft,
    "rlvr": _train_rlvr,
    "opsd": _train_arm,
    "evaluate": _evaluate,
    "check": _check_teacher,
    "budget": _evaluate_budget,
    "lengths": _measure_budget_lengths,
}
