"""Pipeline configuration: typed dataclasses with the tiny CPU values as defaults, validated at load.

A config file is YAML whose keys mirror `PipelineConfig`; anything left out keeps its default, so a
preset is an override file (compare `configs/tiny.yaml` and `configs/qwen3-8b.yaml` to see what
changes with scale). Command-line `key=value` overrides use dotted paths (`opsd.max_steps=10`) and
YAML values. Unknown keys, values of the wrong type, bad choices and impossible sizes are errors
naming the key (and, for a wrong type, the type expected).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opsdlab.evaluate import SamplingConfig, check_backend
from opsdlab.models import DTYPES, TINY_SIZES
from opsdlab.opsd import OPSDStageConfig
from opsdlab.rlvr import RLVRStageConfig
from opsdlab.sft import SFTStageConfig
from opsdlab.vllm_backend import VLLMSettings

STAGES = ("sft", "rlvr", "opsd")
PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""


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

    def __post_init__(self):
        check_backend(self.backend)
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
        return _build(OPSDStageConfig, {**dataclasses.asdict(self.opsd), **arm.overrides}, f"arms.{arm.name}")


# Labels that section dataclasses put in front of their own error messages; a message located
# under a config key drops it, so that no error reads `opsd: opsd: ...`.
_SECTION_LABELS = (*STAGES, "sampling")


def located(where: str, error: Exception | str) -> str:
    """`error`'s message under the config key `where`, without the section label the message carries."""
    text = str(error)
    labels = {*_SECTION_LABELS, where.rsplit(".", 1)[-1]} if where else set(_SECTION_LABELS)
    head, sep, rest = text.partition(": ")
    if sep and head in labels:
        text = rest
    return f"{where}: {text}" if where else text


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", dict: "a mapping", type(None): "null"}


def check_value(value, hint, key: str):
    """`value` checked against the field annotation `hint`; the value to store, or a ConfigError.

    Integers are accepted for float fields, and so are strings that read as a number: YAML reads
    `1e-6` (no dot) as a string. A list is stored as a tuple. Annotations this function does not
    know are accepted as they are.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        ok, converted = _matches(value, option)
        if ok:
            return converted
    expected = " or ".join(_TYPE_NAMES.get(option, getattr(option, "__name__", str(option))) for option in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _matches(value, option) -> tuple[bool, object]:
    if option is type(None):
        return value is None, value
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if option is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if option is str:
        return isinstance(value, str), value
    if option is tuple:
        return isinstance(value, (list, tuple)), tuple(value) if isinstance(value, (list, tuple)) else value
    if option is dict:
        return isinstance(value, dict), value
    return True, value


def _build(cls, data, where: str):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        elif name == "arms":
            values[name] = tuple(_arm(a, key) for a in check_value(value, tuple, key))
        else:
            values[name] = check_value(value, hint, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(located(where or "config", error)) from error


def _arm(value, where: str) -> ArmSection:
    if isinstance(value, ArmSection):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where}: each arm is a mapping with a `name` and OPSD overrides, got {value!r}")
    overrides = {k: v for k, v in value.items() if k != "name"}
    return ArmSection(name=str(value["name"]), overrides=overrides)


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def resolve_preset(path: str | Path) -> Path:
    """A config file, or the name of a shipped preset (`configs/*.yaml`: tiny, tiny-nothink, tiny-search, qwen3-1.7b, qwen3-8b)."""
    candidate = Path(path)
    if candidate.is_file():  # a folder named like a preset (say a run directory) is not a config
        return candidate
    shipped = PRESET_DIR / f"{path}.yaml"
    if shipped.exists():
        return shipped
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {path}: no such file, and not a shipped preset ({', '.join(presets)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    data: dict = {}
    if path is not None:
        source = resolve_preset(path)
        try:
            data = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config {source}: not valid YAML ({error})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config {source}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. opsd.max_steps=10")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return _build(PipelineConfig, data, "")


def to_dict(config: PipelineConfig) -> dict:
    """Plain-data form of a config, as written to the run directory."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    data = plain(dataclasses.asdict(config))
    data["arms"] = [{"name": arm.name, **arm.overrides} for arm in config.arms]
    return data


def dump_config(config: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
