"""The steps that evaluate: a checkpoint on every evaluation set (sampled, greedy, and the teacher
prompt if asked), each evaluation cached by its `summary.json`, its problems split over the processes
of a launch (`evaluate.evaluate_sharded`); and the teacher check of the OPSD start checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from opsdlab.config import PipelineConfig
from opsdlab.config.choices import CONTEXT_READS
from opsdlab.evaluation.evaluate import evaluate_sharded, load_for_eval, one_line, write_eval
from opsdlab.modeling.runtime import is_main_process, main_decides, wait_for_everyone
from opsdlab.run.outputs import run_outputs
from opsdlab.run.plan import Run, Step, eval_folder, eval_runs
from opsdlab.run.problems import verifier_of
from opsdlab.run.provenance import write_record
from opsdlab.run.rundir import log
from opsdlab.tasks.prompts import CONTROL_CONTEXTS


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


def _evaluate(run: Run, step: Step) -> None:
    evaluate_checkpoint(run.run_dir, step.checkpoint, Path(step.model_dir), run.config, run.task, run.sets,
                        teacher_context=step.context, announce_skips=step.kind == "evaluate", outputs=run.outputs)


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
