"""The sections of a pipeline config and the config itself: typed dataclasses with the tiny CPU values as defaults.

Each section checks its own values when it is built; `PipelineConfig` also builds every OPSD arm's
settings (`arm_config`), so that a bad arm fails when the config loads, not mid-run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from opsdlab.config.choices import STAGES
from opsdlab.config.values import ConfigError, build, check_value, located
from opsdlab.evaluation.evaluate import SamplingConfig, check_backend
from opsdlab.stages.methods import check_arm, method_of
from opsdlab.modeling.models import DTYPES, TINY_SIZES
from opsdlab.stages.opsd import OPSDStageConfig
from opsdlab.stages.rlvr import RLVRStageConfig
from opsdlab.stages.sft import SFTStageConfig
from opsdlab.tasks import OPTIONS, TASKS, check_options
from opsdlab.evaluation.vllm_backend import VLLMSettings


@dataclass(frozen=True)
class ModelSection:
    init: str = "tiny"  # "tiny": build the offline default; otherwise a Hugging Face model folder
    size: str = "tiny"  # the offline model's size, one of models.TINY_SIZES (used when init is "tiny")
    dtype: str = "float32"  # one of models.DTYPES; bfloat16 on GPUs
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.size not in TINY_SIZES:
            raise ConfigError(f"model.size: expected one of {', '.join(TINY_SIZES)}, got {self.size!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class TaskSection:
    name: str = "synthetic"
    options: dict = field(default_factory=dict)
    thinking: bool = True
    verifier: dict = field(default_factory=dict)  # empty: the task's default (extract, compare)

    def __post_init__(self):
        if self.name not in TASKS:
            raise ConfigError(f"task.name: unknown task {self.name!r}; choose one of {sorted(TASKS)}")
        # Each given option is checked against the task's own option type (None passes: a task may
        # read a YAML null as "none"), then the task's config checks the values.
        hints = typing.get_type_hints(OPTIONS[self.name]) if not isinstance(OPTIONS[self.name], tuple) else {}
        options = {key: value if value is None or key not in hints else check_value(value, hints[key],
                                                                                    f"task.options.{key}")
                   for key, value in self.options.items()}
        try:
            check_options(self.name, options)
        except ValueError as error:
            hint = "" if "unknown option" not in str(error) else (
                " (a preset's options for another task stay when only task.name is overridden: override "
                "task.options as well, e.g. task.options={})")
            raise ConfigError(f"{error}{hint}") from error
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class EvalSection:
    sets: tuple = ("synthetic",)  # "synthetic": the task's held-out split; or jsonl/parquet paths, Hub names
    columns: str | None = None
    problems: int = 200
    sampling: SamplingConfig = SamplingConfig()
    greedy: bool = True
    teacher_check: bool = True
    base: bool = True  # false: skip the random-init base model (all-wrong, and slow: it never stops)
    backend: str = "transformers"  # a key of evaluate.BACKENDS: "transformers" or "vllm"
    vllm: VLLMSettings = VLLMSettings()  # the vLLM engine, when backend is "vllm"
    dtype: str | None = None  # the evaluated weights' dtype; None: model.dtype (training's)
    # The token budgets of each summary's accuracy_at_budget; empty: a ladder from the evaluated lengths.
    budgets: tuple = ()

    def __post_init__(self):
        check_backend(self.backend)
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.budgets):
            raise ConfigError(f"eval.budgets: expected positive token counts, got {list(self.budgets)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"eval.dtype: expected one of {', '.join(DTYPES)} or null, got {self.dtype!r}")


@dataclass(frozen=True)
class ArmSection:
    name: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    seeds: tuple = ()  # pipeline seeds: run_dir/seed-<n>/ per seed (`pipeline.run_seeds`); empty: one run, `seed`
    stages: tuple = STAGES
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sft: SFTStageConfig = SFTStageConfig()
    rlvr: RLVRStageConfig = RLVRStageConfig()
    opsd: OPSDStageConfig = OPSDStageConfig()
    arms: tuple = (ArmSection("all", {"gate": "all"}), ArmSection("correct", {"gate": "correct"}),
                   ArmSection("incorrect", {"gate": "incorrect"}))
    opsd_seeds: tuple = (0,)
    eval: EvalSection = EvalSection()
    # Processes that run independent steps side by side (the SFT evaluation beside RLVR, the OPSD
    # arms beside each other; `pipeline.run_in_workers`); 1: every step in this process, in order.
    workers: int = 1

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(_arm(arm, "arms") for arm in self.arms))
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; valid stages are {list(STAGES)}")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arms: names must be unique, got {names}")
        for arm in self.arms:
            self.arm_config(arm)  # validates each arm's overrides now, not mid-run
        if not self.opsd_seeds:
            raise ConfigError("opsd_seeds: give at least one seed")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers: expected a positive number of processes, got {self.workers!r}")
        if (any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds)
                or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds: expected distinct non-negative integers, got {list(self.seeds)}")

    def check_batches(self, num_processes: int) -> None:
        """Raise a ConfigError, before any stage runs, if a configured stage's batch does not split
        evenly over `num_processes` processes and its gradient-accumulation steps."""
        sections = [(name, getattr(self, name)) for name in ("sft", "rlvr") if name in self.stages]
        if "opsd" in self.stages:
            sections += [(f"arms.{arm.name}", self.arm_config(arm)) for arm in self.arms]
        for where, section in sections:
            try:
                section.per_device_batch(num_processes)
            except ValueError as error:
                raise ConfigError(located(where, error)) from error

    def arm_config(self, arm: ArmSection) -> OPSDStageConfig:
        """An arm's settings: the `opsd` section, then its method's defaults (`methods.METHODS`; for
        `contrastive`, also its `contrast_variant`'s), then the arm's own overrides."""
        where = f"arms.{arm.name}"
        try:
            method = method_of(arm.overrides, self.opsd, where)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        base = dataclasses.asdict(self.opsd)
        defaults = method.defaults_for({**base, **method.defaults, **arm.overrides})
        section = build(OPSDStageConfig, {**base, **defaults, **arm.overrides}, where)
        try:
            check_arm(section, where)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return section


def _arm(value, where: str) -> ArmSection:
    if isinstance(value, ArmSection):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where}: each arm is a mapping with a `name` and OPSD overrides, got {value!r}")
    overrides = {k: v for k, v in value.items() if k != "name"}
    return ArmSection(name=str(value["name"]), overrides=overrides)

