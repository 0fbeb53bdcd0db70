"""The steps that train: the base model (built here for the tiny default), SFT, RLVR and each OPSD
arm with its compaction method. Each is skipped once finished (`model/COMPLETE`), writes its record
before it trains, so that a stage killed midway resumes only under its own settings, and logs its
seconds when done.
"""

from __future__ import annotations

import time
from pathlib import Path

from opsdlab.config import PipelineConfig
from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy, save_policy
from opsdlab.modeling.runtime import is_main_process, main_decides, read_updates, skipped_note, trained_nothing
from opsdlab.run.outputs import base_record
from opsdlab.run.plan import Run, Step, arm_settings, base_dir
from opsdlab.run.problems import check_problems
from opsdlab.run.provenance import write_record
from opsdlab.run.rundir import finish_stage, stage_done
from opsdlab.stages.methods import TRAINING
from opsdlab.modeling.console import done_line, say_started, stage_label, stage_line
from opsdlab.stages.rlvr import run_rlvr
from opsdlab.stages.rollout_budget import budget_note, read_stage_tokens
from opsdlab.stages.sft import TeacherProbe, run_sft


def prepare_base(run_dir: Path, config: PipelineConfig, task) -> Path:
    """The starting model folder: the tiny default built here (with its record), or the user's folder."""
    if config.model.init != "tiny":
        return base_dir(config)
    stage_dir = run_dir / "base"
    if not stage_done(stage_dir):
        message = ""
        if is_main_process():
            write_record(stage_dir, base_record(config))  # built from settings alone: it reads nothing
            tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
            model = build_tiny_model(tokenizer, config.model.size, seed=config.seed)
            save_policy(model, tokenizer, stage_dir / "model")
            params = sum(p.numel() for p in model.parameters())
            message = stage_line("base", "done", f"built the offline {config.model.size} Qwen3 model: "
                                 f"{params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
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


def _train_stage(run: Run, stage_dir: Path, stage: str, label: str, train, detail: str = "") -> None:
    """Call `train()` unless the stage is complete, then mark it complete and log its seconds, with the
    rollout-token budget when it ended the stage (`rollout_budget.budget_note`) and a
    warning when some of its optimizer steps were skipped (`runtime.skipped_note`); each in the stage
    commands' words (`progress.stage_line`), under the stage's `label` (`stage_label`).

    The stage's record is written before training starts, so a stage killed midway resumes only
    under the settings it started with (`check_run_dir` compares them first).
    """
    if stage_done(stage_dir):
        if is_main_process():
            print(stage_line(label, "skipped", "finished with these settings"), flush=True)
        return
    if is_main_process() and stage_dir in run.outputs:  # with what it reads: its start is finished by now
        write_record(stage_dir, run.outputs[stage_dir].expected())
    say_started(stage_dir, label, detail)
    start = time.time()
    train()
    seconds = time.time() - start
    message, record = done_line(label, stage_dir / "model", seconds), {}
    if note := budget_note(main_decides(lambda: read_stage_tokens(stage_dir))):  # a stage its budget ended
        message += f"; {note}"
    updates = main_decides(lambda: read_updates(stage_dir))
    if note := skipped_note(updates):  # an OPSD stage whose gate kept nothing in some steps
        message += f". WARNING: {note}" + (", so its model is the one it started from" * trained_nothing(updates))
        record = {"warning": note}
    finish_stage(run.run_dir, stage_dir, message, kind="stage", stage=stage, seconds=round(seconds, 1), **record)


def _train_sft(run: Run, step: Step) -> None:
    config, stage_dir = run.config, run.run_dir / "sft"

    def train():
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        rows = run.task.sft_rows(tokenizer, config.sft.rows, thinking=config.task.thinking, seed=config.seed)
        run_sft(model, tokenizer, rows, config.sft, stage_dir, seed=config.seed,
                callbacks=sft_probe(config, stage_dir, run.sets, run.verifier))

    _train_stage(run, stage_dir, "sft", stage_label("sft"), train)


def _train_rlvr(run: Run, step: Step) -> None:
    config, stage_dir = run.config, run.run_dir / "rlvr"

    def train():
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        examples = run.task.examples("train", config.rlvr.train_problems)
        run_rlvr(model, tokenizer, examples, run.verifier, config.rlvr, stage_dir, thinking=config.task.thinking,
                 seed=config.seed, check_examples=check_problems(config, config.rlvr))

    _train_stage(run, stage_dir, "rlvr", stage_label("rlvr"), train)


def _train_arm(run: Run, step: Step) -> None:
    """Train one arm with its compaction method (`stages.methods.TRAINING`) from the starting checkpoint."""
    config = run.config
    stage_dir = run.run_dir / "opsd" / f"{step.arm}-s{step.opsd_seed}"
    arm_config = arm_settings(config, step.arm)
    label = stage_label("opsd", step.arm, step.opsd_seed)

    def train():
        examples = run.task.examples("train", arm_config.train_problems)
        model, tokenizer = load_policy(step.model_dir, config.model.dtype, config.model.trust_remote_code)
        TRAINING[arm_config.method](model, tokenizer, examples, run.verifier, arm_config, stage_dir,
                                         thinking=config.task.thinking, seed=step.opsd_seed,
                                         check_examples=check_problems(config, arm_config), rlvr=config.rlvr,
                                         label=label)

    method = "" if arm_config.method == "opsd" else f"method {arm_config.method}"
    _train_stage(run, stage_dir, step.checkpoint, label, train, detail=method)
