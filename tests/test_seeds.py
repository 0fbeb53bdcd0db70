"""Pipeline seeds (`seeds: [...]`, `pipeline.run_seeds`) and the study command over them."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from opsdlab.run import pipeline
from opsdlab.cli import main
from opsdlab.config import ConfigError, load_config
from opsdlab.run import study
from opsdlab.run.study import STUDY_ARMS, run_parts, study_config


def test_seeds_default_to_the_single_seed_layout(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, redo=(): calls.append(config) or Path(config.run_dir))
    config = load_config("tiny", [f"run_dir={tmp_path}"])
    assert config.seeds == ()
    assert pipeline.run_seeds(config) == tmp_path
    assert calls == [config]  # unchanged: one run in run_dir itself


def test_each_seed_is_a_single_seed_run_in_its_own_directory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, redo=(): calls.append(config) or Path(config.run_dir))
    config = load_config("tiny", [f"run_dir={tmp_path}", "seeds=[2, 0]", "opsd_seeds=[0, 1]"])
    assert pipeline.run_seeds(config) == tmp_path
    assert [(c.seed, c.seeds, c.run_dir, c.opsd_seeds) for c in calls] == [
        (2, (), str(tmp_path / "seed-2"), (0, 1)), (0, (), str(tmp_path / "seed-0"), (0, 1))]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seeds"] == [2, 0]


def test_pipeline_command_with_seeds_reports_over_seeds(tmp_path, monkeypatch, capsys):
    from test_report_seeds import _eval

    def fake_run(config, redo=()):  # a finished single-seed run: RLVR and one arm evaluated
        run_dir = Path(config.run_dir)
        _eval(run_dir, "rlvr", "synthetic", 1, 10)
        _eval(run_dir, "opsd-all-s0", "synthetic", 1 + config.seed, 5)
        return run_dir

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    assert main(["pipeline", "--config", "tiny", f"run_dir={tmp_path}", "seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "seed 0:" in out and "seed 1:" in out and str(tmp_path / "report" / "report.md") in out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| opsd-all-s0 | 2 | 0.750 ± 0.354 (0.500–1.000) |" in text


@pytest.mark.parametrize("value", ["[0, 0]", "[-1]", "[1.5]", "[true]", "3"])
def test_bad_seeds_are_errors_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^seeds: "):
        load_config("tiny", [f"seeds={value}"])


def test_one_run_directory_holds_one_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, redo=(): Path(config.run_dir))
    single, seeded = tmp_path / "single", tmp_path / "seeded"
    single.mkdir()
    (single / "summary.jsonl").write_text("")
    (seeded / "seed-0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a single-seed run"):
        pipeline.run_seeds(load_config("tiny", [f"run_dir={single}", "seeds=[0]"]))
    with pytest.raises(ConfigError, match="holds a run over seeds"):
        pipeline.run_seeds(load_config("tiny", [f"run_dir={seeded}"]))


def test_study_config_is_the_preset_with_the_study_seeds_and_arms(tmp_path):
    config = study_config("tiny", tmp_path, seeds=(0, 1, 2), overrides=["opsd.max_steps=3"])
    assert config.run_dir == str(tmp_path / "tiny") and config.seeds == (0, 1, 2) and config.opsd.max_steps == 3
    arms = {arm.name: config.arm_config(arm) for arm in config.arms}
    assert [arm["name"] for arm in STUDY_ARMS] == list(arms) == ["all", "correct", "incorrect", "concise", "none",
                                                                 "unrelated"]
    assert {name: (a.gate, a.teacher_context) for name, a in arms.items()} == {
        "all": ("all", "solution"), "correct": ("correct", "solution"), "incorrect": ("incorrect", "solution"),
        "concise": ("all", "concise"), "none": ("all", "none"), "unrelated": ("all", "unrelated")}


def test_study_presets_must_have_distinct_names(tmp_path, capsys):
    assert main(["study", "--presets", "tiny,tiny", "--run-dir", str(tmp_path)]) == 2
    assert "presets: expected distinct preset names" in capsys.readouterr().err
    assert main(["study", "--presets", "nosuch", "--run-dir", str(tmp_path)]) == 2
    assert "config nosuch: no such file" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


TINY_STUDY = ["sft.rows=32", "sft.max_steps=2", "sft.batch_size=8", "sft.save_steps=100",
              "rlvr.max_steps=1", "rlvr.prompts_per_step=2", "rlvr.group_size=2", "rlvr.max_completion_length=12",
              "rlvr.train_problems=8", "rlvr.save_steps=100",
              "opsd.max_steps=1", "opsd.prompts_per_step=2", "opsd.rollouts_per_prompt=1",
              "opsd.max_completion_length=12", "opsd.train_problems=8", "opsd.save_steps=100", "opsd.refill_max_rounds=1",
              "eval.problems=3", "eval.greedy=false", "eval.sampling={k: 2, max_new_tokens: 12}"]


def _digests(root: Path) -> dict[Path, str]:
    files = [*root.glob("seed-*/*/model/model.safetensors"), *root.glob("seed-*/opsd/*/model/model.safetensors"),
             *root.glob("seed-*/eval/*/*/summary.json")]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_tiny_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    """`opsdlab study` on 2 seeds with every study arm, a few steps each; rerun after losing one arm-seed."""
    argv = ["study", "--presets", "tiny", "--seeds", "0,1", "--run-dir", str(tmp_path), *TINY_STUDY]
    assert main(argv) == 0
    root = tmp_path / "tiny"
    assert "study wall time" in capsys.readouterr().out
    for seed in (0, 1):
        seed_dir = root / f"seed-{seed}"
        assert yaml.safe_load((seed_dir / "config.yaml").read_text())["seed"] == seed
        for arm in STUDY_ARMS:
            assert (seed_dir / "opsd" / f"{arm['name']}-s0" / "model" / "COMPLETE").exists()
        # the teacher check ran at the arms' starting checkpoint for every teacher context they use
        for context in ("solution", "concise", "none", "unrelated"):
            assert (seed_dir / "eval" / "rlvr" / f"synthetic-teacher-{context}" / "summary.json").exists()
        assert (seed_dir / "report" / "report.md").exists()
    problems = {s: [json.loads(line)["problem_id"] for line in
                    (root / f"seed-{s}" / "eval" / "rlvr" / "synthetic" / "samples.jsonl").read_text().splitlines()]
                for s in (0, 1)}
    assert problems[0] and problems[0] == [json.loads(line)["problem_id"] for line in
                                           (root / "seed-0/eval/rlvr/synthetic-teacher-unrelated/samples.jsonl")
                                           .read_text().splitlines()]
    text = (root / "report" / "report.md").read_text()
    for expected in ("Findings (hold in every seed)", "| opsd-unrelated-s0 | 2 |", "| rlvr | unrelated |",
                     "| opsd-correct-s0 | 1 |", "| opsd-none-s0 | 2/2 |", "changes_synthetic.png"):
        assert expected in text, expected

    finished = _digests(root)
    lost = root / "seed-1" / "opsd" / "unrelated-s0"
    lost_eval = root / "seed-1" / "eval" / "opsd-unrelated-s0"
    for path in sorted(lost.rglob("*"), reverse=True) + sorted(lost_eval.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    lost.rmdir()
    lost_eval.rmdir()
    assert main(argv) == 0
    again = _digests(root)
    redone = {p for p in again if "unrelated-s0" in str(p) and "seed-1" in str(p)}
    assert redone and all(again[p] == finished[p] for p in finished if p not in redone)
    assert set(again) == set(finished)


def test_run_parts_runs_at_most_jobs_at_once_and_returns_every_exit_code(tmp_path):
    """Four parts, two at a time: each records when it ran; the failing one does not stop the others."""
    script = ("import sys, time; open(sys.argv[1], 'w').write(str(time.time())); time.sleep(0.4); "
              "open(sys.argv[1], 'a').write(' ' + str(time.time())); sys.exit(int(sys.argv[2]))")
    parts = [([sys.executable, "-c", script, str(tmp_path / f"times-{i}"), str(3 if i == 1 else 0)],
              tmp_path / "logs" / f"part-{i}.log") for i in range(4)]
    codes = run_parts(parts, jobs=2, poll_seconds=0.05)
    assert codes == {tmp_path / "logs" / f"part-{i}.log": (3 if i == 1 else 0) for i in range(4)}
    spans = [tuple(map(float, (tmp_path / f"times-{i}").read_text().split())) for i in range(4)]
    for start, _ in spans:  # how many parts were running at each part's start
        assert sum(s <= start < e for s, e in spans) <= 2
    assert max(s for s, _ in spans) >= min(e for _, e in spans)  # the third part waited for a slot


def test_a_failed_study_part_is_a_clean_error_naming_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run_parts", lambda parts, jobs, env: {log: (1 if "seed-1" in log.name else 0)
                                                                       for _, log in parts})
    # after a failed part the parent must stop, not go on to run the seeds itself
    monkeypatch.setattr(study, "run_seeds", lambda config: pytest.fail("the study went on after a failed part"))
    argv = ["study", "--jobs", "2", "--presets", "tiny", "--seeds", "0,1", "--run-dir", str(tmp_path)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "1 of 2 parts failed" in error and str(tmp_path / "tiny" / "seed-1.log") in error
    assert main([*argv[:2], "0", *argv[3:]]) == 2
    assert "jobs: expected a positive number" in capsys.readouterr().err


def test_tiny_study_with_two_jobs_runs_each_seed_in_its_own_process(tmp_path, capsys):
    """`--jobs 2`: the two seeds run side by side as processes with their own logs; the report is over both."""
    argv = ["study", "--jobs", "2", "--presets", "tiny", "--seeds", "0,1", "--run-dir", str(tmp_path), *TINY_STUDY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 parts, 2 at a time" in out and "study wall time" in out
    root = tmp_path / "tiny"
    for seed in (0, 1):
        # each part is its seed's own pipeline run: it ends with that seed's report, not the study's
        assert f"report: {root / f'seed-{seed}' / 'report' / 'report.md'}" in (root / f"seed-{seed}.log").read_text()
        for arm in STUDY_ARMS:
            assert (root / f"seed-{seed}" / "opsd" / f"{arm['name']}-s0" / "model" / "COMPLETE").exists()
    assert yaml.safe_load((root / "config.yaml").read_text())["seeds"] == [0, 1]
    assert "| opsd-none-s0 | 2/2 |" in (root / "report" / "report.md").read_text()


def test_an_interrupted_run_parts_stops_the_parts_still_running(tmp_path, monkeypatch):
    started, real_popen = [], study.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(study.subprocess, "Popen", popen)
    monkeypatch.setattr(study.time, "sleep", interrupt)
    parts = [([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / f"part-{i}.log") for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        run_parts(parts, jobs=2)
    assert len(started) == 2 and all(process.poll() is not None for process in started)
