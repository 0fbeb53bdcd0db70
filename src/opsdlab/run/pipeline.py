"""The one place that chains stages: base -> SFT -> RLVR -> OPSD arms, evaluated at every boundary.

A run directory holds everything a report needs and is how a run resumes:

    config.yaml                 resolved config
    summary.jsonl               one line per finished stage or evaluation: seconds, peak memory
    base/model/                 the starting model (built here for the tiny default)
    sft/ rlvr/                  model/ (final HF folder), checkpoints/, metrics.jsonl
    sft/probe.jsonl             with sft.probe_every: student and teacher accuracy per probed step
    opsd/<arm>-s<seed>/         model/, checkpoints/, metrics.jsonl, token_stats.jsonl (each arm's
                                compaction method: `config.methods.METHODS`; a `budget` arm trains nothing)
    eval/<checkpoint>/<set>/    summary.json, samples.jsonl (also <set>-greedy, <set>-teacher-<context>)
    budget/<arm>/               a budget arm with quantile budgets: the starting checkpoint's sampled
                                responses to training problems, whose lengths set its budgets

A finished stage has `model/COMPLETE`; a finished evaluation has `summary.json`. Rerunning skips
both, and a stage killed midway resumes from its last checkpoint; nothing finished is rewritten.

Under a multi-process launch (`accelerate launch`, torchrun) every process runs this function:
every process trains each stage (the Trainer splits the batch), and each evaluates a share of the
problems (`evaluate.evaluate_sharded`). The main process alone builds the base model and writes the run
directory's files; whether a stage or evaluation is finished is decided on the main process and
shared (`runtime.main_decides`), so every process skips the same work. A process group is started
only under such a launch; a plain `python` run stays a single process.

With `seeds: [0, 1, 2]` (`run_seeds`), the run directory holds `config.yaml`, `report/` and one
such single-seed run directory per seed, `seed-<n>/`.

The work after the base model is a list of steps (`pipeline_steps`: train a stage, evaluate a
checkpoint, check a teacher prompt), each naming the steps whose outputs it reads. One process runs
them in list order. With `workers: N` (> 1, single-process runs only) N worker processes run every
step whose inputs are finished, side by side: the SFT evaluation beside RLVR, the RLVR evaluation
beside the OPSD arms. Each step seeds itself, so the outputs are those of the single-process order;
on a CPU whose results do not depend on the thread count they are identical to the last digit.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy
import torch

from opsdlab.config import ConfigError, PipelineConfig, dump_config
from opsdlab.config.choices import CONTEXT_READS
from opsdlab.config.methods import METHODS
from opsdlab.tasks.data import ColumnMap, Example, load_examples, pair_unrelated, parse_column_map
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import evaluate_sharded, load_for_eval, one_line, read_samples, write_eval
from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy, save_policy
from opsdlab.stages.methods import TRAINING
from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig, SFTStageConfig
from opsdlab.run.preflight import check_inputs
from opsdlab.tasks.prompts import CONTROL_CONTEXTS
from opsdlab.run.provenance import (COMPLETE, Output, describe_stale, dependants, flatten, make_record, new_stamp,
                                path_fingerprint, read_record, stale_outputs, write_record)
from opsdlab.stages.rlvr import LENGTH_TARGET_PROBLEMS, run_rlvr
from opsdlab.modeling.runtime import is_main_process, launch_processes, main_decides, peak_memory_mb, wait_for_everyone
from opsdlab.stages.sft import TeacherProbe, run_sft
from opsdlab.tasks import build_task
from opsdlab.tasks.verifier import VerifierConfig

def log(run_dir: Path, message: str, **record) -> None:
    """Print `message` and append it to summary.jsonl with the writing process's peak memory so far
    (main process only; other processes do nothing)."""
    if not is_main_process():
        return
    print(message, flush=True)
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "message": message, **record, **peak_memory_mb()}
    with open(run_dir / "summary.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "model" / COMPLETE).exists()


def stage_done(stage_dir: Path) -> bool:
    """Whether a stage is finished, as the main process sees it, on every process."""
    return main_decides(lambda: is_complete(stage_dir))


def finish_stage(run_dir: Path, stage_dir: Path, message: str, **record) -> None:
    """Mark a trained stage complete and log it on the main process; every process waits for it."""
    if is_main_process():
        (stage_dir / "model" / COMPLETE).write_text(new_stamp())  # what later outputs record they read
        log(run_dir, message, **record)
    wait_for_everyone()


def verifier_of(config: PipelineConfig, task) -> VerifierConfig:
    return VerifierConfig(**{**task.default_verifier, **config.task.verifier})


def eval_sets(config: PipelineConfig, task) -> dict:
    """Held-out problems per evaluation set name, each paired with another one's solution (the
    `unrelated` teacher check reads it)."""
    return {name if is_task_set(config, name) else set_label(name):
            pair_unrelated(set_examples(name, task, config.eval.problems, config.eval.columns,
                                        generated=is_task_set(config, name)))
            for name in config.eval.sets}


def set_examples(name: str, task, problems: int | None, columns: str | None, generated: bool) -> list[Example]:
    """The first `problems` problems of an evaluation set: `task`'s held-out split (`generated`), or
    the rows of a file or Hub dataset, whose reference solutions are optional."""
    if generated:
        return task.examples("test", problems)
    return load_examples(name, parse_column_map(columns) if columns else ColumnMap(), split="test", limit=problems,
                         optional_solution=True)


def eval_folder(run_dir: Path, checkpoint: str, folder_name: str) -> Path:
    """Where one evaluation of a checkpoint lives: eval/<checkpoint>/<set><suffix>/."""
    return Path(run_dir) / "eval" / checkpoint / folder_name


def set_label(name: str) -> str:
    """The folder name of an evaluation set: the task's own split, or a file's stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)


def is_task_set(config: PipelineConfig, name: str) -> bool:
    return name == "synthetic" or name == config.task.name


def eval_runs(config: PipelineConfig, teacher_context: str | None) -> list[tuple[str, SamplingConfig, str]]:
    """The evaluations of one checkpoint on one set: (folder suffix, sampling, prompt context) each."""
    runs = [("", config.eval.sampling, "none")]
    if config.eval.greedy:
        runs.append(("-greedy", SamplingConfig(k=1, temperature=0.0, max_new_tokens=config.eval.sampling.max_new_tokens,
                                               batch_size=config.eval.sampling.batch_size), "none"))
    if teacher_context:
        runs.append((f"-teacher-{teacher_context}", config.eval.sampling, teacher_context))
    return runs


def evaluate_checkpoint(run_dir: Path, name: str, model_dir: Path, config: PipelineConfig, task, sets: dict,
                        teacher_context: str | None = None, announce_skips: bool = True,
                        outputs: dict | None = None, budgets: dict | None = None, answer_tokens: int = 32,
                        notes: dict | None = None) -> dict:
    """Evaluate one checkpoint on every set (sampled, greedy, and the teacher prompt if asked); cached.

    Every process takes part (each evaluates its share of the problems); the main process writes
    the files, and every process returns, once they are written, their summaries by set name.
    `budgets` (set name -> tokens) evaluates under budget forcing (`evaluate`'s `budget`); `notes`
    are added to each summary (a budget's source, `budget_from`).
    """
    verifier = verifier_of(config, task)
    results, model, tokenizer, skipped = {}, None, None, 0
    if outputs is None:  # the records each evaluation folder carries (`Run.outputs` in a pipeline)
        outputs = {output.folder: output for output in run_outputs(replace(config, run_dir=str(run_dir)))}
    dtype = config.eval.dtype or config.model.dtype
    for set_name, examples in sets.items():
        for suffix, sampling, context in eval_runs(config, teacher_context):
            out = eval_folder(run_dir, name, f"{set_name}{suffix}")
            field = CONTEXT_READS.get(context)
            if field and not all(getattr(example, field).strip() for example in examples):
                if is_main_process():
                    print(f"[eval] {name}/{set_name}{suffix}: skipped, the teacher prompt ({context}) reads each "
                          f"problem's {field} and this set's problems lack one", flush=True)
                continue
            if main_decides(lambda: (out / "summary.json").exists()):
                skipped += 1
            else:
                if model is None:
                    model, tokenizer = load_for_eval(model_dir, config.eval.backend, dtype,
                                                     config.model.trust_remote_code, config.eval.vllm, config.seed)
                start = time.time()
                forcing = {"budget": budgets[set_name], "answer_tokens": answer_tokens} if budgets else {}
                samples, summary = evaluate_sharded(model, tokenizer, examples, verifier, sampling,
                                                    backend=config.eval.backend, thinking=config.task.thinking,
                                                    context=context, desc=f"eval {name}/{set_name}{suffix}",
                                                    **forcing, **shared_budgets(config))
                if is_main_process():
                    summary.update(checkpoint=name, dtype=dtype, **(notes or {}))
                    if out in outputs:
                        write_record(out, outputs[out].expected())
                    write_eval(out, samples, summary)
                    log(run_dir, one_line(f"[eval] {name}/{set_name}{suffix}", summary), kind="eval",
                        checkpoint=name, set=f"{set_name}{suffix}", seconds=round(time.time() - start, 1))
                wait_for_everyone()
            results[f"{set_name}{suffix}"] = json.loads((out / "summary.json").read_text())
    if announce_skips and skipped and model is None and is_main_process():
        print(f"[eval] {name}: skipped, {skipped} evaluation(s) already done with these settings", flush=True)
    return results


def shared_budgets(config: PipelineConfig) -> dict:
    """`evaluate`'s budgets argument when the config sets eval.budgets (else each set's own ladder)."""
    return {"budgets": list(config.eval.budgets)} if config.eval.budgets else {}


def write_config(config: PipelineConfig, run_dir: Path) -> None:
    """The resolved config into `run_dir/config.yaml`, by the main process; every process waits."""
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
    wait_for_everyone()


def base_dir(config: PipelineConfig) -> Path:
    """The starting model folder: the tiny default built in the run directory, or the user's folder."""
    return Path(config.run_dir) / "base" / "model" if config.model.init == "tiny" else Path(config.model.init)


def prepare_base(run_dir: Path, config: PipelineConfig, task) -> Path:
    """The starting model folder: the tiny default built here (with its record), or the user's folder."""
    if config.model.init != "tiny":
        return Path(config.model.init)
    stage_dir = run_dir / "base"
    if not stage_done(stage_dir):
        message = ""
        if is_main_process():
            write_record(stage_dir, base_record(config))  # built from settings alone: it reads nothing
            tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
            model = build_tiny_model(tokenizer, config.model.size, seed=config.seed)
            save_policy(model, tokenizer, stage_dir / "model")
            params = sum(p.numel() for p in model.parameters())
            message = (f"[base] built the offline {config.model.size} Qwen3 model: {params / 1e6:.2f}M parameters, "
                       f"vocabulary {len(tokenizer)}")
        finish_stage(run_dir, stage_dir, message, kind="stage", stage="base")
    return stage_dir / "model"


def sft_probe(config: PipelineConfig, stage_dir: Path, sets: dict, verifier) -> list:
    """The SFT teacher probe, if configured: the first evaluation set's first `probe_problems`
    problems, from the student prompt and the OPSD teacher's."""
    if not config.sft.probe_every:
        return []
    examples = next(iter(sets.values()))[:config.sft.probe_problems]
    return [TeacherProbe(stage_dir / "probe.jsonl", examples, verifier, ["none", config.opsd.teacher_context],
                         every=config.sft.probe_every, thinking=config.task.thinking,
                         max_new_tokens=config.eval.sampling.max_new_tokens, k=config.sft.probe_k,
                         temperature=config.sft.probe_temperature)]


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


def open_run(config: PipelineConfig) -> Run:
    """The task, evaluation sets and verifier of a run, built from its config (cheap; each process builds its own)."""
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    outputs = {output.folder: output for output in run_outputs(config)}
    return Run(config, task, eval_sets(config, task), verifier_of(config, task), outputs)


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


# What shapes each kind of output, as records (`provenance`): a rerun compares them with the
# records already in the run directory.

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


def setting_defaults(config: PipelineConfig) -> dict:
    """Each setting's default (its dataclass's), by dotted key: a record notes which settings hold
    theirs, so that an option added later is no difference while it holds its default."""
    from opsdlab.config.sections import VLLMSettings
    from opsdlab.config.tasks import OPTIONS

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
        settings.update(task_settings(config))
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
            inputs = {**(external if reads is None else {}), **data}
            record = make_record(step.kind, stage_settings(config, step, verifier), inputs, defaults)
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
                inputs = {**(external if reads is None else {}), **set_inputs[name]}
                record = make_record("evaluate", settings, inputs, defaults)
                outputs.append(Output(folder, step.name, record, after=after, kind="eval", reads=reads))
    return outputs


# What `--redo` takes besides "changed" (every output whose settings differ): a stage, every
# evaluation, or one OPSD arm by its checkpoint name.
REDO_STAGES = {"base": "build base", "sft": "train sft", "rlvr": "train rlvr"}


def redo_steps(outputs: list[Output], redo, stale: dict) -> set:
    """The steps `--redo` names (and every step that reads one of them)."""
    steps = {output.step for output in outputs}
    chosen = set()
    for target in redo:
        if target == "changed":
            chosen |= {output.step for output in outputs if output.folder in stale}
        elif target == "eval":
            chosen |= {output.step for output in outputs if output.kind == "eval"}
        elif target == "opsd":
            chosen |= {step for step in steps if step.startswith("train opsd-")}
        elif REDO_STAGES.get(target) in steps or f"train {target}" in steps:
            chosen.add(REDO_STAGES.get(target) or f"train {target}")
        else:
            arms = sorted(step.split(" ", 1)[1] for step in steps if step.startswith("train opsd-"))
            valid = ["changed", *[name for name, step in REDO_STAGES.items() if step in steps],
                     *(["opsd"] if arms else []), "eval", *arms]
            raise ConfigError(f"--redo {target}: not a stage of this run; valid: {', '.join(valid)}")
    return dependants(outputs, chosen)


def legacy_records(config: PipelineConfig, outputs: list[Output]) -> dict | None:
    """For outputs made before records were written: the records that the run directory's
    config.yaml (the settings it was last run with) implies; None if there is no such output."""
    if all(read_record(output.folder) is not None for output in outputs if output.exists()):
        return None
    from opsdlab.config import load_config

    try:
        previous = load_config(Path(config.run_dir) / "config.yaml")
    except (ConfigError, ValueError, OSError):
        return None
    previous = replace(previous, run_dir=config.run_dir, seeds=(), workers=config.workers)
    return {output.folder: output.record for output in run_outputs(previous)}


def _differing(config: PipelineConfig, redo) -> tuple[list[Output], dict, list, set, dict]:
    """The run's outputs; those made with other settings; those to adopt; the steps `redo` names;
    and the differing outputs `redo` does not cover."""
    outputs = run_outputs(config)
    stale, adopt = stale_outputs(outputs, legacy_records(config, outputs))
    chosen = redo_steps(outputs, redo, stale)
    step_of = {output.folder: output.step for output in outputs}
    remaining = {folder: diffs for folder, diffs in stale.items() if step_of[folder] not in chosen}
    return outputs, stale, adopt, chosen, remaining


def check_run_dir(config: PipelineConfig, redo=()) -> list[tuple[str, str]]:
    """Make the run directory agree with `config` before any step runs; the lines to say, each with
    its kind: "redo" and "notice" lines go to the run log, "print" lines (said on every rerun) only
    to the screen.

    Outputs whose record matches are kept. Outputs named by `redo` (and what reads them) are
    removed, to be made again. If any other output was made with other settings, raise a
    ConfigError naming them, having changed nothing.
    """
    outputs, stale, adopt, chosen, remaining = _differing(config, redo)
    if remaining:
        raise ConfigError(describe_stale(Path(config.run_dir), outputs, remaining))
    lines = []
    for output in outputs:
        if output.step in chosen and output.exists():
            why = "; ".join(stale.get(output.folder, [])[:3]) or "asked with --redo"
            shutil.rmtree(output.folder)
            lines.append(("redo", f"[redo] removed {output.folder.relative_to(config.run_dir)} to redo "
                                  f"{output.step} ({why})"))
    for output in adopt:
        write_record(output.folder, output.expected())
    extra = unplanned_outputs(Path(config.run_dir), outputs)
    if extra:
        shown = ", ".join(str(folder.relative_to(config.run_dir)) for folder in extra[:4])
        lines.append(("print", f"[pipeline] kept {len(extra)} output(s) that this config does not make ({shown}"
                               f"{' ...' if len(extra) > 4 else ''}); each carries the settings that made it, and "
                               "the report shows them"))
    if adopt:
        lines.append(("notice", f"[pipeline] recorded the settings of {len(adopt)} earlier output(s) from "
                                "config.yaml (they were made before outputs carried their settings)"))
    return lines


def unplanned_outputs(run_dir: Path, outputs: list[Output]) -> list[Path]:
    """Trained arms and evaluations in the run directory that the current config does not make
    (say an arm since removed, or greedy evaluations after eval.greedy=false)."""
    planned = {output.folder for output in outputs}
    found = [*run_dir.glob("opsd/*"), *run_dir.glob("eval/*/*"), *run_dir.glob("budget/*")]
    return sorted(folder for folder in found if folder.is_dir() and folder not in planned)


def prepare_run_dir(config: PipelineConfig, redo=()) -> None:
    """`check_run_dir` on the main process (every process gets its verdict), then config.yaml written."""
    run_dir = Path(config.run_dir)

    def decide():
        try:
            return None, check_run_dir(config, redo)
        except ConfigError as error:
            return str(error), []

    error, lines = main_decides(decide)
    if error:
        raise ConfigError(error)
    write_config(config, run_dir)
    for kind, line in lines:
        if kind != "print":
            log(run_dir, line, kind=kind)
        elif is_main_process():
            print(line, flush=True)


def _train_stage(run: Run, stage_dir: Path, stage: str, label: str, train) -> None:
    """Call `train()` unless the stage is complete, then mark it complete and log its seconds.

    The stage's record is written before training starts, so a stage killed midway resumes only
    under the settings it started with (`check_run_dir` compares them first).
    """
    if stage_done(stage_dir):
        if is_main_process():
            print(f"{label} skipped: finished with these settings", flush=True)
        return
    if is_main_process():
        if stage_dir in run.outputs:  # with what it reads: the stage it starts from is finished by now
            write_record(stage_dir, run.outputs[stage_dir].expected())
        if not any((stage_dir / "checkpoints").glob("checkpoint-*")):  # else the stage says where it resumes
            print(f"{label} started", flush=True)
    start = time.time()
    train()
    seconds = time.time() - start
    finish_stage(run.run_dir, stage_dir, f"{label} done in {seconds:.0f}s, {memory_text()}", kind="stage",
                 stage=stage, seconds=round(seconds, 1))


def memory_text() -> str:
    """This process's peak memory so far, for a log line."""
    peaks = peak_memory_mb()
    text = f"peak memory {peaks['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in peaks else "peak memory unknown"
    return text + (f", GPU {peaks['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in peaks else "")


def _train_sft(run: Run, step: Step) -> None:
    config, stage_dir = run.config, run.run_dir / "sft"

    def train():
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        rows = run.task.sft_rows(tokenizer, config.sft.rows, thinking=config.task.thinking, seed=config.seed)
        run_sft(model, tokenizer, rows, config.sft, stage_dir, seed=config.seed,
                callbacks=sft_probe(config, stage_dir, run.sets, run.verifier))

    _train_stage(run, stage_dir, "sft", "[sft]", train)


def _train_rlvr(run: Run, step: Step) -> None:
    config, stage_dir = run.config, run.run_dir / "rlvr"

    def train():
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        examples = run.task.examples("train", config.rlvr.train_problems)
        run_rlvr(model, tokenizer, examples, run.verifier, config.rlvr, stage_dir, thinking=config.task.thinking,
                 seed=config.seed, check_examples=check_problems(config, config.rlvr))

    _train_stage(run, stage_dir, "rlvr", "[rlvr]", train)


def check_problems(config: PipelineConfig, stage) -> list[Example] | None:
    """The held-out problems a stage grades while it trains (`stage.check_every` > 0), disjoint from
    the evaluation's: the task's test problems after the first `eval.problems`, or the rows of the
    first evaluation file after them. A checkpoint chosen on the problems it is then scored on would
    be scored too well."""
    if not stage.check_every:
        return None
    first, start, wanted = config.eval.sets[0], config.eval.problems, stage.check_problems
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    problems = set_examples(first, task, start + wanted, config.eval.columns,
                            generated=is_task_set(config, first))[start:]
    if not problems:
        raise ConfigError(f"check_every: the held-out check needs problems beyond the {start} evaluated ones of "
                          f"{first}; lower eval.problems or evaluate on a larger set")
    return problems


def _train_arm(run: Run, step: Step) -> None:
    """Train one arm with its compaction method (`stages.methods.TRAINING`) from the starting checkpoint."""
    config = run.config
    stage_dir = run.run_dir / "opsd" / f"{step.arm}-s{step.opsd_seed}"
    arm_config = arm_settings(config, step.arm)

    def train():
        examples = run.task.examples("train", arm_config.train_problems)
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        TRAINING[arm_config.method](model, tokenizer, examples, run.verifier, arm_config, stage_dir,
                                         thinking=config.task.thinking, seed=step.opsd_seed,
                                         check_examples=check_problems(config, arm_config), rlvr=config.rlvr)

    method = "" if arm_config.method == "opsd" else f" ({arm_config.method})"
    _train_stage(run, stage_dir, step.checkpoint, f"[opsd] arm {step.arm}{method} seed {step.opsd_seed}", train)


def _evaluate(run: Run, step: Step) -> None:
    evaluate_checkpoint(run.run_dir, step.checkpoint, Path(step.model_dir), run.config, run.task, run.sets,
                        teacher_context=step.context, announce_skips=step.kind == "evaluate", outputs=run.outputs)


def budget_lengths_folder(run_dir: Path, arm: str) -> Path:
    """Where a budget arm's measured lengths live: budget/<arm>/ (summary.json, samples.jsonl)."""
    return Path(run_dir) / "budget" / arm


def lengths_problems(config: PipelineConfig, arm: str) -> int:
    """How many training problems set a budget arm's quantile budgets: the first `LENGTH_TARGET_PROBLEMS`
    of the arm's `train_problems`, as a `length_rl` arm measures its target."""
    return min(LENGTH_TARGET_PROBLEMS, arm_settings(config, arm).train_problems)


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


def _check_teacher(run: Run, step: Step) -> None:
    """The teacher check: the OPSD start checkpoint on one arm's teacher prompt, and a warning if it
    is not more accurate than the student prompt (`step.context` is None without eval.teacher_check)."""
    done_before = main_decides(lambda: {name: step.context is not None and _teacher_folder(run.run_dir, step, name).exists()
                                        for name in run.sets})
    _evaluate(run, step)
    if step.context is not None:
        fresh = {name: examples for name, examples in run.sets.items() if not done_before[name]}
        _warn_if_teacher_not_better(run.run_dir, step.checkpoint, fresh, step.context)


def _teacher_folder(run_dir: Path, step: Step, set_name: str) -> Path:
    return eval_folder(run_dir, step.checkpoint, f"{set_name}-teacher-{step.context}") / "summary.json"


STEP_KINDS = {
    "sft": _train_sft,
    "rlvr": _train_rlvr,
    "opsd": _train_arm,
    "evaluate": _evaluate,
    "check": _check_teacher,
    "budget": _evaluate_budget,
    "lengths": _measure_budget_lengths,
}


class StepError(RuntimeError):
    """A step failed in a worker process; the message names it."""


def run_pipeline(config: PipelineConfig, redo=()) -> Path:
    """Run (or resume) every configured stage and evaluation; return the run directory.

    Outputs already in the run directory are kept if they were made with these settings;
    `redo` names outputs to make again (`check_run_dir`). Any other difference stops the run
    before anything is changed.
    """
    processes = launch_processes()
    config.check_batches(processes)  # an uneven batch fails now, not after the stages before it
    run_dir = Path(config.run_dir)
    prepare_run_dir(config, redo)
    workers = config.workers if processes == 1 else 1
    if workers > 1:
        _start_forkserver()  # its imports overlap with the steps that run before any worker is needed
    elif config.workers > 1:
        log(run_dir, f"[pipeline] workers: {config.workers} applies to single-process runs; under this launch of "
                     f"{processes} processes every stage splits over them, so the steps run in order", kind="notice")
    torch.manual_seed(config.seed)
    run = open_run(config)
    steps = pipeline_steps(config, prepare_base(run_dir, config, run.task))
    if workers == 1:
        for step in steps:
            STEP_KINDS[step.kind](run, step)
    else:
        run_in_workers(config, steps, workers)
    return run_dir


def _start_forkserver() -> None:
    """Start the fork server that worker processes come from, with the pipeline already imported in it:
    a worker then starts in milliseconds, not the seconds that importing torch, transformers and TRL take,
    and it forks from a process that never ran a parallel region, so its own thread pool is fresh."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(["opsdlab.run.pipeline"])
    multiprocessing.forkserver.ensure_running()


def _run_step_in_worker(config: PipelineConfig, step: Step, threads: int) -> None:
    torch.set_num_threads(threads)
    STEP_KINDS[step.kind](open_run(config), step)


# Rough relative cost of each kind of step, for the order in which ready steps start: a training
# stage takes several times as long as one checkpoint's evaluations on the demo and on real models.
STEP_COSTS = {"sft": 4, "rlvr": 4, "opsd": 4, "evaluate": 1, "check": 1, "budget": 1, "lengths": 1}


def step_priorities(steps: list[Step]) -> dict:
    """Each step's cost plus the costliest chain of steps that read its output (the longest path to
    the end of the run, by `STEP_COSTS`): starting the highest first keeps the chain that decides
    when the run ends moving, and leaves the evaluations, which nothing long waits for, to fill gaps."""
    readers = {step.name: [other for other in steps if step.name in other.after] for step in steps}
    priorities: dict = {}

    def priority(step: Step) -> int:
        if step.name not in priorities:
            priorities[step.name] = STEP_COSTS[step.kind] + max((priority(r) for r in readers[step.name]), default=0)
        return priorities[step.name]

    for step in steps:
        priority(step)
    return priorities


def steps_to_start(waiting: list[Step], finished: set, running: int, workers: int, threads: int,
                   priorities: dict | None = None) -> list[tuple[Step, int]]:
    """Which waiting steps to start now, and with how many threads each.

    A step is ready once every step it reads has finished; up to `workers` run at once, the highest
    of `priorities` first (ties, and without priorities: in list order). A step that starts with
    nothing else running or ready gets all `threads` (SFT, at the start: nothing runs beside it);
    steps that may run side by side get an even share, at least one each.
    """
    ready = [step for step in waiting if set(step.after) <= finished]
    if priorities:
        ready.sort(key=lambda step: -priorities[step.name])  # stable: ties keep list order
    share = threads if running == 0 and len(ready) == 1 else max(1, threads // workers)
    return [(step, share) for step in ready[:max(0, workers - running)]]


def run_in_workers(config: PipelineConfig, steps: list[Step], workers: int) -> None:
    """Run `steps` in up to `workers` processes at once, each as soon as the steps it reads have finished.

    Order and threads per step: `steps_to_start`, by `step_priorities`, out of this process's torch
    threads. A failed step lets the running ones finish, starts nothing new and raises a StepError;
    rerunning resumes, as after any interruption.
    """
    context = multiprocessing.get_context("forkserver")
    threads = torch.get_num_threads()
    waiting, running, finished, failed = list(steps), {}, set(), []
    priorities = step_priorities(steps)
    try:
        while running or (waiting and not failed):
            starts = [] if failed else steps_to_start(waiting, finished, len(running), workers, threads, priorities)
            for step, step_threads in starts:
                process = context.Process(target=_run_step_in_worker, name=step.name,
                                          args=(config, step, step_threads))
                process.start()
                running[step.name] = process
                waiting.remove(step)
            if not running:
                raise StepError(f"steps {[step.name for step in waiting]} wait for steps that never run")
            multiprocessing.connection.wait([process.sentinel for process in running.values()])
            for name, process in list(running.items()):
                if process.exitcode is None:
                    continue
                process.join()
                del running[name]
                if process.exitcode == 0:
                    finished.add(name)
                else:
                    failed.append(f"{name} (exit code {process.exitcode})")
    finally:  # interrupted: stop the steps still running (each resumes on the next call)
        for process in running.values():
            process.terminate()
            process.join()
    if failed:
        raise StepError(f"pipeline step {', '.join(failed)} failed; its error is printed above. Finished stages and "
                        "evaluations are kept: rerun the same command to resume")


def seed_run_dir(run_dir: str | Path, seed: int) -> Path:
    """Where `run_seeds` puts pipeline seed `seed`: a complete single-seed run directory."""
    return Path(run_dir) / f"seed-{seed}"


def seed_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """Pipeline seed `seed` of a run over seeds: a single-seed run in its `seed-<n>/` directory."""
    return replace(config, seed=seed, seeds=(), run_dir=str(seed_run_dir(config.run_dir, seed)))


def run_seeds(config: PipelineConfig, redo=()) -> Path:
    """`run_pipeline` once per entry of `config.seeds`, each in its own `seed-<n>/` run directory.

    Each seed is a normal single-seed run (`seed: n`, its own SFT, RLVR and OPSD arms), so it
    resumes, and reports, on its own; the top-level run directory holds the config and the
    aggregate report (`report.write_report`). Without `seeds`, this is `run_pipeline(config)`.
    """
    run_dir = Path(config.run_dir)
    check_inputs(config)
    if not config.seeds:
        if any(p.is_dir() for p in run_dir.glob("seed-*")):
            raise ConfigError(f"seeds: {run_dir} holds a run over seeds; set seeds (see its config.yaml) or "
                              "give another run_dir")
        return run_pipeline(config, redo)
    if (run_dir / "summary.jsonl").exists():
        raise ConfigError(f"seeds: {run_dir} holds a single-seed run; give another run_dir")
    check_seed_dirs(config, redo)
    write_config(config, run_dir)
    for seed in config.seeds:
        run_pipeline(seed_config(config, seed), redo)
    return run_dir


def check_seed_dirs(config: PipelineConfig, redo=()) -> None:
    """Refuse a run over seeds before any seed runs if a seed's directory holds outputs made with
    other settings that `redo` does not name (each seed's run then redoes what `redo` names)."""
    def decide():
        for seed in config.seeds:
            seed_run = seed_config(config, seed)
            try:
                outputs, _, _, _, remaining = _differing(seed_run, redo)
            except ConfigError as error:
                return str(error)
            if remaining:
                return describe_stale(Path(seed_run.run_dir), outputs, remaining)
        return None

    error = main_decides(decide)
    if error:
        raise ConfigError(error)


def _warn_if_teacher_not_better(run_dir: Path, checkpoint: str, sets: dict, context: str) -> None:
    if not is_main_process():
        return
    for set_name in sets:
        folder = run_dir / "eval" / checkpoint
        student = folder / set_name / "summary.json"
        teacher = folder / f"{set_name}-teacher-{context}" / "summary.json"
        if student.exists() and teacher.exists():
            s = json.loads(student.read_text())["avg_at_k"]
            t = json.loads(teacher.read_text())["avg_at_k"]
            message = (f"[teacher check] {checkpoint}/{set_name}: student prompt {s:.3f}, "
                       f"teacher prompt ({context}) {t:.3f}")
            if t <= s and context not in CONTROL_CONTEXTS:
                message += ("  WARNING: the privileged prompt is not more accurate; OPSD has little to teach "
                            "beyond style")
            log(run_dir, message, kind="teacher_check", checkpoint=checkpoint, set=set_name, student=s, teacher=t)
