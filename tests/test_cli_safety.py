"""The command line loses no work: every folder a command writes is checked writable before any model
loads, a Ctrl-C ends with one line and a folder the same command resumes, overrides may stand on
either side of a flag, and `opsdlab --help` lists every command on one line."""

import json
import multiprocessing
from pathlib import Path

import pytest

from opsdlab.cli import build_parser, main


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command loads or builds a model, or starts a pipeline."""
    import opsdlab.run.pipeline  # noqa: F401  (imported first, so that it keeps the real functions it imports)
    import opsdlab.run.study  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work before refusing an unwritable output")

    for target in ("opsdlab.modeling.models.load_policy", "opsdlab.modeling.models.build_tiny_model", "opsdlab.evaluation.evaluate.load_for_eval",
                   "opsdlab.run.pipeline.run_seeds", "opsdlab.run.study.run_study"):
        monkeypatch.setattr(target, refuse)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("")
    return path


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "{model}", "--out", "{out}"], "--out"),
    (["sft", "--model", "tiny", "--out", "{out}"], "--out"),
    (["rlvr", "--model", "{model}", "--out", "{out}"], "--out"),
    (["opsd", "--model", "{model}", "--out", "{out}"], "--out"),
    (["demo", "--run-dir", "{out}"], "run_dir"),
    (["pipeline", "--config", "tiny", "--run-dir", "{out}"], "run_dir"),
    (["study", "--run-dir", "{out}"], "--run-dir"),
])
def test_an_output_under_a_file_is_refused_before_any_work(argv, flag, tiny_folder, a_file, capsys, nothing_loads):
    out = a_file / "sub"
    command = argv[0]
    code = main([arg.format(model=tiny_folder, out=out) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == (f"opsdlab {command}: error: {flag} {out}: cannot write there, {a_file} is a file; "
                                   "give a folder you can write")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_run_dir_on_a_file_system_that_takes_no_folders_is_refused(capsys, nothing_loads):
    assert main(["demo", "--run-dir", "/proc/x"]) == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(
        "opsdlab demo: error: run_dir /proc/x: cannot create folders in /proc (")


def test_the_writability_check_leaves_nothing_behind(tmp_path):
    from opsdlab.run.preflight import check_writable

    check_writable(tmp_path / "a" / "b", "--out")
    check_writable(tmp_path, "--out")
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """Stopped during step 2 (after checkpoint-1): exit 130, one line, no traceback; the same command
    then resumes from checkpoint-1 and finishes."""
    from opsdlab.modeling.runtime import JsonlMetrics

    real = JsonlMetrics.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        real(self, args, state, control, logs, **kwargs)
        if state.global_step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "sft"
    command = ["sft", "--model", "tiny", "--out", str(out), "max_steps=3", "rows=12", "batch_size=4", "save_steps=1",
               "logging_steps=1"]
    monkeypatch.setattr(JsonlMetrics, "on_log", on_log)
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("opsdlab sft: interrupted; rerun the same command to resume from the "
                                            "last checkpoint")
    assert (out / "checkpoints" / "checkpoint-1").is_dir() and not (out / "model").exists()
    monkeypatch.setattr(JsonlMetrics, "on_log", real)
    assert main(command) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "model" / "model.safetensors").exists() and max(steps) == 3


def _interrupted_step(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_worker_stopped_by_ctrl_c_exits_quietly(tmp_path, capfd, monkeypatch):
    """A Ctrl-C reaches the pipeline's worker processes too: each exits with 130 and no traceback of
    its own, and the main process, told so, stops as after its own Ctrl-C."""
    from opsdlab.run import plan, steps, workers
    from opsdlab.config import load_config

    monkeypatch.setitem(steps.STEP_KINDS, "evaluate", _interrupted_step)
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    step = plan.Step("eval base", "evaluate", "base", str(tmp_path / "base" / "model"))
    worker = multiprocessing.get_context("fork").Process(target=workers._run_step_in_worker, args=(config, step, 1))
    worker.start()
    worker.join()
    assert worker.exitcode == 130
    assert "Traceback" not in capfd.readouterr().err
    fork = multiprocessing.get_context("fork")  # the forkserver's workers would not see the patched step
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: fork)
    with pytest.raises(KeyboardInterrupt):
        workers.run_in_workers(config, [step], workers=2)


class Taken(Exception):
    """Stops a command once its config is built."""


def test_overrides_split_by_a_flag_are_all_taken(tmp_path, monkeypatch):
    def run_seeds(config, redo=()):
        raise Taken(config)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("opsdlab.run.pipeline.run_seeds", run_seeds)
    with pytest.raises(Taken) as taken:
        main(["demo", "sft.rows=12", "--run-dir", "elsewhere", "opsd.max_steps=3", "--redo", "eval", "rlvr.max_steps=2"])
    config, = taken.value.args
    assert (config.sft.rows, config.opsd.max_steps, config.rlvr.max_steps) == (12, 3, 2)
    assert config.run_dir == "elsewhere"
    args = build_parser().parse_args(["opsd", "max_steps=1", "--model", "m", "gate=all", "--out", "o", "beta=0"])
    assert args.overrides == ["max_steps=1", "gate=all", "beta=0"] and (args.model, args.out) == ("m", "o")


def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    commands = list(parser._subparsers._group_actions[0].choices)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    description = " ".join(lines[lines.index("") + 1:lines.index("positional arguments:")])
    for command in commands:
        assert command in description, command
        line = next(index for index, text in enumerate(lines) if text.split()[:1] == [command])
        assert len(lines[line].split()) > 1 and (lines[line + 1].split() or [""])[0] in (*commands, ""), lines[line]
