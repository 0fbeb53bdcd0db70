"""The plan of a run: the steps after the base model (`pipeline_steps`: train a stage, evaluate a
checkpoint, check a teacher prompt, measure or apply a budget), the folders they write, and `Run`,
what every step reads. Plain data, so that a worker process receives a step pickled, and so that the
records (`outputs`) and the run directory's checks (`rundir`) are computed from the same list the
steps run in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opsdlab.config import PipelineConfig
from opsdlab.config.sections import SamplingConfig
from opsdlab.modeling.models import model_folder
from opsdlab.config.methods import METHODS
from opsdlab.config.stages import OPSDStageConfig
from opsdlab.stages.methods import TRAINING
from opsdlab.stages.rlvr import LENGTH_TARGET_PROBLEMS
from opsdlab.tasks.verifier import VerifierConfig


def base_dir(config: PipelineConfig) -> Path:
    """The starting model folder: the tiny default built in the run directory, or the user's folder
    (a Hub model id: its snapshot in the Hugging Face cache, which the pre-flight check fetched)."""
    if config.model.init == "tiny":
        return Path(config.run_dir) / "base" / "model"
    return model_folder(config.model.init, "model.init", download=False)


def eval_folder(run_dir: Path, checkpoint: str, folder_name: str) -> Path:
    """Where one evaluation of a checkpoint lives: eval/<checkpoint>/<set><suffix>/."""
    return Path(run_dir) / "eval" / checkpoint / folder_name


def eval_runs(config: PipelineConfig, teacher_context: str | None) -> list[tuple[str, SamplingConfig, str]]:
    """The evaluations of one checkpoint on one set: (folder suffix, sampling, prompt context) each."""
    runs = [("", config.eval.sampling, "none")]
    if config.eval.greedy:
        runs.append(("-greedy", SamplingConfig(k=1, temperature=0.0, max_new_tokens=config.eval.sampling.max_new_tokens,
                                               batch_size=config.eval.sampling.batch_size), "none"))
    if teacher_context:
        runs.append((f"-teacher-{teacher_context}", config.eval.sampling, teacher_context))
    return runs


@dataclass(frozen=True)
class Step:
    """One unit of the work after the base model, as data (a worker process receives it pickled).

    `kind` is a key of `STEP_KINDS`; `checkpoint` names what the step trains or evaluates ("sft",
    "rlvr", "opsd-<arm>-s<seed>", "base") and `model_dir` the folder it starts from or evaluates;
    `after` names the steps whose outputs it reads.
    """

    name: str
    kind: str
    checkpoint: str
    model_dir: str
    after: tuple = ()
    context: str | None = None  # the teacher prompt evaluated beside the student's (evaluate, check)
    arm: str | None = None      # opsd: the arm's name and its OPSD seed
    opsd_seed: int = 0
    source: str | None = None   # budget, lengths: the checkpoint it evaluates (under budget forcing) or measures
    budget: tuple = ()          # budget: ("tokens", B) or ("quantile", q) of the source's lengths on training problems


@dataclass(frozen=True)
class Run:
    """What every step of one run reads: its config, task, evaluation sets and verifier."""

    config: PipelineConfig
    task: object
    sets: dict
    verifier: VerifierConfig
    outputs: dict  # output folder -> its `provenance.Output` (`run_outputs`): the record it must carry

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def pipeline_steps(config: PipelineConfig, base: Path) -> list[Step]:
    """Every step after the base model, in the order one process runs them.

    The teacher checks of the OPSD start checkpoint run one after another, after its own
    evaluation: each rereads (and would otherwise rewrite) the same student-prompt evaluation.
    """
    run_dir = Path(config.run_dir)
    steps: list[Step] = []
    start, start_dir, made_by = "base", base, ()  # the latest checkpoint, its folder, the step that trains it
    if config.eval.base:
        steps.append(Step("eval base", "evaluate", "base", str(base)))
    for stage in ("sft", "rlvr"):
        if stage not in config.stages:
            continue
        stage_model = run_dir / stage / "model"
        teacher = config.opsd.teacher_context if stage == "sft" and config.eval.teacher_check else None
        steps += [Step(f"train {stage}", stage, stage, str(start_dir), after=made_by),
                  Step(f"eval {stage}", "evaluate", stage, str(stage_model), after=(f"train {stage}",),
                       context=teacher)]
        start, start_dir, made_by = stage, stage_model, (f"train {stage}",)
    if "opsd" not in config.stages:
        return steps
    previous = made_by + tuple(step.name for step in steps if step.kind == "evaluate" and step.checkpoint == start)
    arms = {arm.name: config.arm_config(arm) for arm in config.arms}
    for context in sorted({arms[arm.name].teacher_context for arm in config.arms
                           if METHODS[arms[arm.name].method].uses_teacher}):
        name = f"check {start} {context}"
        steps.append(Step(name, "check", start, str(start_dir), after=previous,
                          context=context if config.eval.teacher_check else None))
        previous = (name,)
    for arm in config.arms:
        if TRAINING[arms[arm.name].method] is None:  # budget forcing: evaluations of the start only
            points, reads = budget_points(arms[arm.name]), made_by
            if any(kind == "quantile" for _, (kind, _) in points):  # measured on training problems first
                steps.append(Step(f"lengths {arm.name}", "lengths", start, str(start_dir), after=made_by,
                                  arm=arm.name, source=start))
                reads = made_by + (f"lengths {arm.name}",)
            for label, budget in points:
                name = f"opsd-{arm.name}-{label}-s0"
                steps.append(Step(f"eval {name}", "budget", name, str(start_dir), after=reads, arm=arm.name,
                                  source=start, budget=budget))
            continue
        for seed in config.opsd_seeds:
            name = f"opsd-{arm.name}-s{seed}"
            steps += [Step(f"train {name}", "opsd", name, str(start_dir), after=made_by, arm=arm.name, opsd_seed=seed),
                      Step(f"eval {name}", "evaluate", name, str(run_dir / "opsd" / f"{arm.name}-s{seed}" / "model"),
                           after=(f"train {name}",))]
    return steps


def arm_settings(config: PipelineConfig, name: str) -> OPSDStageConfig:
    """The settings of the arm called `name` (`PipelineConfig.arm_config`)."""
    return config.arm_config(next(arm for arm in config.arms if arm.name == name))


def budget_points(arm: OPSDStageConfig) -> list[tuple[str, tuple]]:
    """The evaluations of a `budget` arm, (label, budget) each: its `budgets` in tokens (`b64`), else
    its `budget_quantiles` of the starting checkpoint's sampled response lengths on training problems
    (`q50`; `_measure_budget_lengths`)."""
    if arm.budgets:
        return [(f"b{tokens}", ("tokens", tokens)) for tokens in arm.budgets]
    return [(f"q{round(q * 100)}", ("quantile", q)) for q in arm.budget_quantiles]


def budget_lengths_folder(run_dir: Path, arm: str) -> Path:
    """Where a budget arm's measured lengths live: budget/<arm>/ (summary.json, samples.jsonl)."""
    return Path(run_dir) / "budget" / arm


def lengths_problems(config: PipelineConfig, arm: str) -> int:
    """How many training problems set a budget arm's quantile budgets: the first `LENGTH_TARGET_PROBLEMS`
    of the arm's `train_problems`, as a `length_rl` arm measures its target."""
    return min(LENGTH_TARGET_PROBLEMS, arm_settings(config, arm).train_problems)
