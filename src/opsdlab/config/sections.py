"""The sections of a pipeline config and the config itself: typed dataclasses with the tiny CPU values as defaults.

Each section checks its own values when it is built; `PipelineConfig` also builds every OPSD arm's
settings (`arm_config`), so that a bad arm fails when the config loads, not mid-run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from opsdlab.config.choices import BACKENDS, DTYPES, STAGES, TINY_SIZES
from opsdlab.config.methods import check_arm, method_of
from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig, SFTStageConfig
from opsdlab.config.values import ConfigError, build, check_value, located
from opsdlab.config.tasks import OPTIONS, check_options, held_out_refusal


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. temperature 0 means greedy (then k must be 1)."""

    k: int = 4
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 192
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"sampling: k must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ValueError(f"sampling: temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.k != 1:
            raise ValueError("sampling: greedy decoding (temperature 0) gives identical samples; use k=1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("sampling: max_new_tokens and batch_size must be >= 1")


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM engine of an evaluation is built (`eval.vllm` in the pipeline config).

    tensor_parallel_size shards one model over that many GPUs; data_parallel_size runs that many
    engine replicas (`Replicas`), each in its own process on its own GPUs and share of the prompts.
    gpu_memory_utilization is the fraction of device memory vLLM takes for weights and KV cache; on
    CPU it is a fraction of the NUMA node's RAM, of which this process's resident memory is
    subtracted (`VLLM_CPU_KVCACHE_SPACE=<GiB>` sets the KV cache directly), so keep it small there. enforce_eager None means eager on CPU (no compilation) and CUDA graphs on GPU.
    max_model_len None takes the model's context length. in_process runs vLLM's engine and model
    in this process instead of spawning an engine process and a worker: it starts faster (the
    spawned processes each import vLLM and torch again), which is what a CPU or a test wants; the
    default keeps vLLM's own layout, which overlaps scheduling with the GPU's work.
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    in_process: bool = False

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("vllm: tensor_parallel_size and data_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.data_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"vllm: max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class ModelSection:
    init: str = "tiny"  # "tiny": build the offline default; otherwise a Hugging Face model folder or Hub id
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
        if self.name not in OPTIONS:
            raise ConfigError(f"task.name: unknown task {self.name!r}; choose one of {sorted(OPTIONS)}")
        # Each given option is checked against the task's own option type (None passes: a task may
        # read a YAML null as "none"), then the task's config checks the values.
        hints = typing.get_type_hints(OPTIONS[self.name])
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
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
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
    # arms beside each other; `workers.run_in_workers`); 1: every step in this process, in order.
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
        own = [name for name in self.eval.sets if name in ("synthetic", self.task.name)]
        if self.task.name == "file" and own:
            raise ConfigError(f"eval.sets: {own} is the task's own held-out split, but "
                              f"{held_out_refusal(self.task.options.get('train'))}; name evaluation files, "
                              "e.g. eval.sets=[math500.jsonl, aime24.jsonl]")

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
        """An arm's settings: the `opsd` section, then its method's defaults, then the arm's own overrides
        (`method_config`)."""
        return method_config(self.opsd, arm.overrides, f"arms.{arm.name}")


def method_config(base: OPSDStageConfig, overrides: dict, where: str) -> OPSDStageConfig:
    """The settings of one compaction run: `base` (an `opsd` section), then the defaults of the method it
    names (`methods.METHODS`; for `contrastive`, also its `contrast_variant`'s), then `overrides`, which
    win; checked for what the method needs (`methods.check_arm`). A pipeline arm and the `opsdlab opsd`
    stage command build theirs the same way."""
    try:
        method = method_of(overrides, base, where)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    values = dataclasses.asdict(base)
    defaults = method.defaults_for({**values, **method.defaults, **overrides})
    section = build(OPSDStageConfig, {**values, **defaults, **overrides}, where)
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
