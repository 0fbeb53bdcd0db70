"""Every output a config makes in its run directory, with the record it must carry (`run_outputs`):
what shapes each kind of output (stage settings, evaluation settings, the content of the files it
reads), as records (`provenance`). A rerun compares them with the records already in the run
directory (`rundir.check_run_dir`).
"""

from __future__ import annotations

from pathlib import Path

from opsdlab.config import PipelineConfig
from opsdlab.config.sections import SamplingConfig, VLLMSettings
from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig, SFTStageConfig
from opsdlab.config.tasks import OPTIONS
from opsdlab.run.plan import (Step, arm_settings, base_dir, budget_lengths_folder, eval_folder, eval_runs,
                              lengths_problems, pipeline_steps)
from opsdlab.run.problems import is_task_set, set_label
from opsdlab.run.provenance import Output, flatten, make_record, path_fingerprint
from opsdlab.tasks import build_task

# How a generated task's held-out problems are drawn, in the record of every output that reads them (an
# evaluation of the task's split, a stage that checks on it): since each problem is held out once, an
# output made from a held-out split that could repeat a problem is stale, not silently compared.
HELD_OUT_RULE = {"task.held_out": "distinct"}


def task_settings(config: PipelineConfig) -> dict:
    """The task's settings: which problems and rows a stage or evaluation reads, and how prompts render."""
    return {"task.name": config.task.name, **flatten("task.options", config.task.options),
            "task.thinking": config.task.thinking, "seed": config.seed}


def verifier_settings(config: PipelineConfig) -> dict:
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    return flatten("task.verifier", {**task.default_verifier, **config.task.verifier})


def data_inputs(config: PipelineConfig) -> dict:
    """Fingerprints of the user's training file, for a task that reads one."""
    train = config.task.options.get("train")
    return {"train_data": path_fingerprint(train)} if config.task.name == "file" and train else {}


def sets_inputs(config: PipelineConfig, settings: dict) -> dict:
    """The content of the evaluation sets a stage's settings name (`eval.sets`: its held-out checks or the
    SFT probe read them): a task's own split by its name, a file by its fingerprint."""
    if "eval.sets" not in settings:
        return {}
    return {"eval_sets": [name if is_task_set(config, name) else path_fingerprint(name)
                          for name in settings["eval.sets"]]}


def setting_defaults(config: PipelineConfig) -> dict:
    """Each setting's default (its dataclass's), by dotted key: a record notes which settings hold
    theirs, so that an option added later is no difference while it holds its default."""

    defaults = {}
    for prefix, section in (("sft", SFTStageConfig()), ("rlvr", RLVRStageConfig()), ("opsd", OPSDStageConfig()),
                            ("eval.sampling", SamplingConfig()), ("eval.vllm", VLLMSettings())):
        defaults.update(flatten(prefix, section))
    if config.task.name != "file":  # the file task's options count as given (as in the records written so far)
        defaults.update(flatten("task.options", OPTIONS[config.task.name]()))
    return defaults


def base_record(config: PipelineConfig) -> dict:
    return make_record("base", {"model.init": "tiny", "model.size": config.model.size,
                                "task.name": config.task.name, **flatten("task.options", config.task.options),
                                "seed": config.seed}, defaults=setting_defaults(config))


def stage_settings(config: PipelineConfig, step: Step, verifier: dict) -> dict:
    """The settings that shape a trained stage: its section (an arm's: `opsd` with the arm's
    overrides), the weights' dtype, the task, the verifier that rewards or gates it, the seed."""
    common = {"model.dtype": config.model.dtype, **task_settings(config)}
    if step.kind == "sft":
        settings = {**flatten("sft", config.sft), **common}
        if config.sft.probe_every:  # the probe samples during training, from the evaluation sets
            settings.update({"eval.sets": list(config.eval.sets), "eval.problems": config.eval.problems,
                             "eval.sampling.max_new_tokens": config.eval.sampling.max_new_tokens,
                             "opsd.teacher_context": config.opsd.teacher_context})
        return settings
    if step.kind == "rlvr":
        section, settings = config.rlvr, {**flatten("rlvr", config.rlvr), **common, **verifier}
    else:
        section = arm_settings(config, step.arm)
        settings = {**flatten("opsd", section), "arm": step.arm, "opsd_seed": step.opsd_seed, **common, **verifier}
        if section.method == "length_rl":  # RL continued: the run's RL loss settings shape it too
            settings.update(flatten("rlvr", config.rlvr))
    if section.check_every:  # the held-out check's problems (`check_problems`) follow the evaluation's
        settings.update({"eval.sets": list(config.eval.sets[:1]), "eval.problems": config.eval.problems})
        if is_task_set(config, config.eval.sets[0]):
            settings.update(HELD_OUT_RULE)
    return settings


def eval_settings(config: PipelineConfig, set_name: str, sampling: SamplingConfig, context: str,
                  verifier: dict) -> dict:
    """The settings of one evaluation folder: problems, sampling, prompt, backend, weights' dtype,
    `verifier` (`verifier_settings`) and, for the task's own split, the task (a file set's content
    fingerprint is one of its inputs instead, `run_outputs`)."""
    settings = {"eval.problems": config.eval.problems, "eval.prompt": context, "eval.backend": config.eval.backend,
                "eval.dtype": config.eval.dtype or config.model.dtype, **verifier,
                "task.thinking": config.task.thinking}
    if sampling.temperature == 0:
        settings.update({"eval.greedy": True, "eval.sampling.max_new_tokens": sampling.max_new_tokens,
                         "eval.sampling.batch_size": sampling.batch_size})
    else:
        settings.update(flatten("eval.sampling", sampling))
    if config.eval.backend == "vllm":
        settings.update(flatten("eval.vllm", config.eval.vllm))
    if config.eval.budgets:
        settings["eval.budgets"] = list(config.eval.budgets)
    if is_task_set(config, set_name):
        settings.update({**task_settings(config), **HELD_OUT_RULE})
    else:
        settings["eval.columns"] = config.eval.columns
    return settings


def run_outputs(config: PipelineConfig) -> list[Output]:
    """Every output the config makes in its run directory, each with the record it must carry,
    the steps it reads and the stage folder whose model it reads; in the order the steps run."""
    run_dir = Path(config.run_dir)
    base = base_dir(config)
    defaults, verifier, data = setting_defaults(config), verifier_settings(config), data_inputs(config)
    set_inputs = {name: {} if is_task_set(config, name) else {"set": path_fingerprint(name)} for name in config.eval.sets}
    outputs: list[Output] = []
    made = {}  # checkpoint name -> (the folder of the stage that makes it, the step that makes it)
    external = {}  # inputs a user's model folder adds: its files' fingerprint
    if config.model.init == "tiny":
        outputs.append(Output(run_dir / "base", "build base", base_record(config)))
        made["base"] = (run_dir / "base", "build base")
    else:
        made["base"] = (None, None)
        external = {"model": path_fingerprint(base)}
    seen = set()
    for step in pipeline_steps(config, base):
        if step.kind in ("sft", "rlvr", "opsd"):
            source = "base" if step.kind == "sft" or not step.after else step.after[0].split(" ", 1)[1]
            reads, maker = made[source]
            settings = stage_settings(config, step, verifier)
            inputs = {**(external if reads is None else {}), **data, **sets_inputs(config, settings)}
            record = make_record(step.kind, settings, inputs, defaults)
            folder = run_dir / "opsd" / f"{step.arm}-s{step.opsd_seed}" if step.kind == "opsd" else run_dir / step.kind
            outputs.append(Output(folder, step.name, record, after=step.after or ((maker,) if maker else ()),
                                  reads=reads))
            made[step.checkpoint] = (folder, step.name)
            continue
        reads, maker = made[step.source or step.checkpoint]
        if step.kind == "lengths":
            settings = {**eval_settings(config, config.task.name, config.eval.sampling, "none", verifier),
                        "budget.quantile_of": "train", "budget.train_problems": lengths_problems(config, step.arm)}
            outputs.append(Output(budget_lengths_folder(run_dir, step.arm), step.name,
                                  make_record("evaluate", settings, {**(external if reads is None else {}), **data},
                                              defaults),
                                  after=(maker,) if maker else (), kind="eval", reads=reads))
            continue
        # A budget evaluation also reads the measured lengths (its quantile budgets), as its step says.
        after = step.after if step.kind == "budget" else ((maker,) if maker else ())
        forcing = {}
        if step.kind == "budget":
            forcing = {f"budget.{step.budget[0]}": step.budget[1], "arm": step.arm,
                       "opsd.budget_answer_tokens": arm_settings(config, step.arm).budget_answer_tokens}
            if step.budget[0] == "quantile":
                forcing["budget.quantile_of"] = "train"
        for name in config.eval.sets:
            for suffix, sampling, context in eval_runs(config, step.context):
                folder = eval_folder(run_dir, step.checkpoint, f"{set_label(name)}{suffix}")
                if folder in seen:
                    continue
                seen.add(folder)
                settings = {**eval_settings(config, name, sampling, context, verifier), **forcing}
                inputs = {**(external if reads is None else {}), **set_inputs[name],
                          **(data if is_task_set(config, name) else {})}  # a task's own split reads its data
                record = make_record("evaluate", settings, inputs, defaults)
                outputs.append(Output(folder, step.name, record, after=after, kind="eval", reads=reads))
    return outputs
