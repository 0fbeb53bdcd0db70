"""Independent pipeline steps in worker processes (`workers`): the steps, their order and inputs,
which start when, and a 2-worker run that writes what the single-process run writes."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opsdlab.config import ConfigError, load_config
from opsdlab.run.pipeline import run_pipeline
from opsdlab.run.plan import Step, pipeline_steps
from opsdlab.run.workers import StepError, step_priorities, steps_to_start
from test_pipeline import TINY_RUN

TINY_OVERRIDES = [f"{key}={json.dumps(value)}" for key, value in TINY_RUN.items()]


def test_steps_follow_the_single_process_order_and_name_what_they_read(tmp_path):
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    steps = {step.name: step for step in pipeline_steps(config, tmp_path / "base" / "model")}
    assert list(steps) == ["train sft", "eval sft", "train rlvr", "eval rlvr", "check rlvr solution",
                           "train opsd-all-s0", "eval opsd-all-s0", "train opsd-correct-s0", "eval opsd-correct-s0",
                           "train opsd-incorrect-s0", "eval opsd-incorrect-s0"]
    assert steps["eval sft"].after == ("train sft",) and steps["eval sft"].context == "solution"
    assert steps["train rlvr"].after == ("train sft",)  # beside the SFT evaluation
    assert steps["train rlvr"].model_dir == str(tmp_path / "sft" / "model")
    # the teacher check rereads the RLVR evaluation's files, so it never runs beside it
    assert steps["check rlvr solution"].after == ("train rlvr", "eval rlvr")
    for arm in ("all", "correct", "incorrect"):
        assert steps[f"train opsd-{arm}-s0"].after == ("train rlvr",)
        assert steps[f"train opsd-{arm}-s0"].model_dir == str(tmp_path / "rlvr" / "model")
        assert steps[f"eval opsd-{arm}-s0"].model_dir == str(tmp_path / "opsd" / f"{arm}-s0" / "model")


def test_teacher_checks_of_several_contexts_run_one_after_another(tmp_path):
    config = load_config("tiny", [f"run_dir={tmp_path}", "stages=[opsd]", "eval.base=false",
                                  "arms=[{name: a, gate: all}, {name: u, gate: all, teacher_context: unrelated}]"])
    steps = {step.name: step for step in pipeline_steps(config, tmp_path / "base")}
    assert steps["check base solution"].after == ()
    assert steps["check base unrelated"].after == ("check base solution",)
    assert steps["train opsd-u-s0"].after == () and steps["train opsd-u-s0"].model_dir == str(tmp_path / "base")


def _step(name, *after):
    return Step(name, "evaluate", name, "folder", after=after)


def test_steps_to_start_fills_the_workers_with_ready_steps_and_shares_the_threads():
    sft, eval_sft = _step("sft"), _step("eval sft", "sft")
    rlvr, eval_rlvr = _step("rlvr", "sft"), _step("eval rlvr", "rlvr")
    arms = [_step(f"arm {i}", "rlvr") for i in range(3)]
    waiting = [sft, eval_sft, rlvr, eval_rlvr, *arms]
    assert steps_to_start(waiting, set(), 0, 2, 8) == [(sft, 8)]  # alone: every thread
    assert steps_to_start(waiting[1:], {"sft"}, 0, 2, 8) == [(eval_sft, 4), (rlvr, 4)]
    assert steps_to_start([eval_rlvr, *arms], {"sft", "eval sft"}, 1, 2, 8) == []  # RLVR still running
    assert steps_to_start([eval_rlvr, *arms], {"sft", "eval sft", "rlvr"}, 0, 2, 8) == [(eval_rlvr, 4), (arms[0], 4)]
    assert steps_to_start(arms[1:], {"sft", "rlvr"}, 1, 2, 2) == [(arms[1], 1)]
    assert steps_to_start([arms[2]], {"sft", "rlvr"}, 1, 2, 2) == [(arms[2], 1)]  # beside a running step
    assert steps_to_start([arms[2]], {"sft", "rlvr"}, 0, 2, 2) == [(arms[2], 2)]  # the last one, alone
    assert steps_to_start(arms, {"sft", "rlvr"}, 3, 2, 2) == []


def test_priorities_are_the_costliest_chain_from_each_step_to_the_end(tmp_path):
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    priorities = step_priorities(pipeline_steps(config, tmp_path / "base" / "model"))
    # training 4, evaluation or check 1: sft -> rlvr -> an arm -> its evaluation = 4 + 4 + 4 + 1
    assert priorities["train sft"] == 13 and priorities["train rlvr"] == 9
    assert priorities["eval rlvr"] == 2  # the teacher check reads it
    for arm in ("all", "correct", "incorrect"):
        assert priorities[f"train opsd-{arm}-s0"] == 5 and priorities[f"eval opsd-{arm}-s0"] == 1
    assert priorities["eval sft"] == priorities["check rlvr solution"] == 1


def test_with_priorities_the_training_after_a_checkpoint_starts_before_its_evaluation(tmp_path):
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    steps = pipeline_steps(config, tmp_path / "base" / "model")
    priorities = step_priorities(steps)
    waiting = [step for step in steps if step.name not in ("train sft", "train rlvr", "eval sft")]
    started = steps_to_start(waiting, {"train sft", "train rlvr", "eval sft"}, 0, 2, 2, priorities)
    assert [step.name for step, _ in started] == ["train opsd-all-s0", "train opsd-correct-s0"]
    # without priorities, list order: the RLVR evaluation first
    assert [step.name for step, _ in steps_to_start(waiting, {"train sft", "train rlvr", "eval sft"}, 0, 2, 2)] == [
        "eval rlvr", "train opsd-all-s0"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_peak_memory_is_at_least_what_the_process_holds():
    """With 300 MiB filled, the reported peak is at least the resident size the kernel states (VmRSS)."""
    script = ("import torch; from opsdlab.modeling.runtime import peak_memory_mb; block = torch.ones(300 * 2**20 // 4); "
              "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]; "
              "print(int(rss) / 1024, peak_memory_mb()['peak_rss_mb'])")
    resident, peak = map(float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert resident >= 300 and peak >= resident - 1


def _outputs(run_dir: Path) -> dict:
    """Every trained weight file and every evaluation's samples, by path relative to the run."""
    files = [*run_dir.glob("*/model/model.safetensors"), *run_dir.glob("opsd/*/model/model.safetensors"),
             *run_dir.glob("eval/*/*/samples.jsonl")]
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_workers_write_what_one_process_writes(tmp_path):
    for workers in (1, 2):
        run_pipeline(load_config("tiny", [f"run_dir={tmp_path / str(workers)}", *TINY_OVERRIDES, "eval.base=false",
                                          "opsd.max_steps=2", "opsd.save_steps=100", f"workers={workers}"]))
    single, parallel = _outputs(tmp_path / "1"), _outputs(tmp_path / "2")
    # weights: base, sft, rlvr, 2 arms; evaluations: sft (sampled, greedy, teacher), rlvr (sampled, greedy,
    # teacher check), each arm (sampled, greedy)
    assert len(single) == 5 + 3 + 3 + 2 * 2
    assert parallel == single
    records = [json.loads(line) for line in (tmp_path / "2" / "summary.jsonl").read_text().splitlines()]
    # every line carries the peak memory of the worker that wrote it: a loaded model and torch, > 100 MiB
    assert all(record["peak_rss_mb"] > 100 for record in records)
    assert sorted(r["stage"] for r in records if r.get("kind") == "stage") == ["base", "opsd-all-s0", "opsd-correct-s0",
                                                                              "rlvr", "sft"]
    assert all(r["seconds"] >= 0 for r in records if r.get("kind") in ("eval", "stage") and r.get("stage") != "base")


def test_two_workers_print_whole_lines_each_led_by_its_label(tmp_path):
    """The base evaluation runs beside SFT: neither redraws a bar over the other or runs into its lines."""
    config = {"sft": {"rows": 16, "max_steps": 2, "batch_size": 8, "save_steps": 100, "logging_steps": 1},
              "stages": ["sft"], "workers": 2, "run_dir": str(tmp_path / "run"),
              "eval": {"problems": 2, "sampling": {"k": 1, "max_new_tokens": 8}, "greedy": False, "base": True,
                       "teacher_check": False}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "opsdlab.cli", "pipeline", "--config", str(tmp_path / "config.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert "\r" not in out  # nothing is redrawn in place
    lines = out.splitlines()
    progress = [line for line in lines if re.search(r"\b(step|batch) \d+/\d+", line)]  # steps over 30 s
    assert all(re.match(r"\[(sft|eval (base|sft)/synthetic)\] (step|batch) \d+/\d+, ", line) for line in progress)
    assert "[sft] started" in lines and any(line.startswith("[sft] done: wrote ") for line in lines)
    assert any(line.startswith("[eval] base/synthetic: ") for line in lines)


def test_a_failed_step_is_named_and_stops_the_run(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    config = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"model.init={empty}", "stages=[rlvr]",
                                  *TINY_OVERRIDES, "eval.base=false", "workers=2"])
    with pytest.raises(StepError, match=r"train rlvr \(exit code 1\).*rerun the same command to resume"):
        run_pipeline(config)
    assert not (tmp_path / "run" / "eval").exists()  # its evaluation never started


def test_workers_must_be_a_positive_number(tmp_path):
    for bad in ("0", "-1", "true", "1.5"):
        with pytest.raises(ConfigError, match="workers"):
            load_config("tiny", [f"workers={bad}"])


def test_under_a_multi_process_launch_the_steps_run_in_order(tmp_path, monkeypatch):
    from opsdlab.run import pipeline, steps

    started = []
    monkeypatch.setattr(pipeline, "launch_processes", lambda: 2)
    monkeypatch.setattr(pipeline, "run_in_workers", lambda *args: started.append("workers"))
    monkeypatch.setitem(steps.STEP_KINDS, "evaluate", lambda run, step: started.append(step.name))
    run_pipeline(load_config("tiny", [f"run_dir={tmp_path}", "stages=[]", "eval.base=true", "workers=2"]))
    assert started == ["eval base"]
    assert "applies to single-process runs" in (tmp_path / "summary.jsonl").read_text()
