"""Training stages show one labelled bar with a few numbers, not the Trainer's log dicts on stdout."""

import json
import re
from types import SimpleNamespace

from transformers import TrainerState

from opsdlab.modeling.models import build_tiny_model, load_policy
from opsdlab.config.stages import SFTStageConfig
from opsdlab.modeling.console import stage_label, stage_line
from opsdlab.stages.progress import OPSD_POSTFIX, RLVR_POSTFIX, StageProgress, resume_line
from opsdlab.stages.sft import run_sft

ARGS = SimpleNamespace(disable_tqdm=False)


def _drive(progress: StageProgress, state: TrainerState, logs: list[tuple[int, dict]]) -> list[str]:
    """Run a training sequence through the callback; the bar's postfix after each log."""
    progress.on_train_begin(ARGS, state, None)
    shown = []
    for step, log in logs:
        state.global_step = step
        progress.on_step_end(ARGS, state, None)
        progress.on_log(ARGS, state, None, logs=log)
        shown.append(progress.bar.postfix if progress.bar is not None else None)
    return shown


def test_the_bar_shows_the_stage_keys_of_each_log_and_prints_nothing_to_stdout(capsys):
    progress = StageProgress("rlvr", RLVR_POSTFIX)
    state = TrainerState(max_steps=6, is_world_process_zero=True)
    shown = _drive(progress, state, [
        (2, {"loss": 0.12345, "grad_norm": 1.5, "learning_rate": 4e-5, "reward": 0.375,
             "completions/mean_length": 45.0, "rollouts/accuracy": 0.375}),
        # A log without reward (as a summary dict) keeps the last reward shown; NaN is not shown.
        (4, {"loss": 0.25, "reward": float("nan"), "completions/mean_length": 145.7}),
        (6, {"train_runtime": 3.2, "train_loss": 0.2, "total_flos": 10.0}),
    ])
    assert shown == ["loss=0.123, reward=0.375, len=45", "loss=0.25, reward=0.375, len=146",
                     "loss=0.25, reward=0.375, len=146"]
    assert progress.bar.n == 6 and progress.bar.total == 6 and progress.bar.desc == "rlvr"
    progress.on_train_end(ARGS, state, None)
    assert progress.bar is None
    out, err = capsys.readouterr()
    assert out == ""
    assert "rlvr" in err and "6/6" in err and "loss=0.25, reward=0.375, len=146" in err


def test_a_resumed_bar_starts_at_the_checkpoint_step_and_only_the_main_process_draws(capsys):
    resumed = StageProgress("opsd correct s0", OPSD_POSTFIX)
    state = TrainerState(max_steps=20, global_step=10, is_world_process_zero=True)
    resumed.on_train_begin(ARGS, state, None)
    assert resumed.bar.n == 10
    resumed.on_train_end(ARGS, state, None)

    other = StageProgress("opsd correct s0", OPSD_POSTFIX)
    shown = _drive(other, TrainerState(max_steps=4, is_world_process_zero=False),
                   [(1, {"loss": 0.5, "opsd/kept_fraction": 0.25, "completions/mean_length": 12.0})])
    assert shown == [None] and other.postfix_text() == "loss=0.5, kept=0.25, len=12"
    silent = StageProgress("sft", {"loss": "loss"})
    silent.on_train_begin(SimpleNamespace(disable_tqdm=True), TrainerState(max_steps=4), None)
    assert silent.bar is None
    out, _ = capsys.readouterr()
    assert out == ""
    assert resume_line("sft", "/runs/x/sft/checkpoints/checkpoint-40", 800) == \
        "[sft] resumed from checkpoint-40 (step 40 of 800)"


def test_every_command_words_a_stage_alike():
    assert stage_label("sft") == "sft" and stage_label("opsd", "correct", 0) == "opsd correct s0"
    assert stage_line("opsd correct s0", "started") == "[opsd correct s0] started"
    assert stage_line("sft", "skipped", "finished with these settings") == "[sft] skipped: finished with these settings"
    assert stage_line("rlvr", "resumed", "checkpoint-50 (step 50 of 100)") == \
        "[rlvr] resumed from checkpoint-50 (step 50 of 100)"
    assert stage_line("opsd all s1", "done", "wrote x in 3s") == "[opsd all s1] done: wrote x in 3s"


def _tiny_sft(task, tokenizer, stage_dir, max_steps: int, save_steps: int = 1000):
    config = SFTStageConfig(rows=64, max_steps=max_steps, batch_size=8, logging_steps=1, save_steps=save_steps,
                            max_length=128)
    return run_sft(build_tiny_model(tokenizer, seed=0), tokenizer, task.sft_rows(tokenizer, config.rows), config,
                   stage_dir)


def test_drawn_as_lines_a_bar_writes_whole_lines_led_by_its_label(monkeypatch, capsys):
    from opsdlab.modeling import console

    monkeypatch.setattr(console, "LINE_INTERVAL", 0.0)  # a line at every step
    with console.progress_drawn_as("lines"):
        bar = StageProgress("opsd all s0", OPSD_POSTFIX)
        _drive(bar, TrainerState(max_steps=2, is_world_process_zero=True),
               [(1, {"loss": 0.5, "opsd/kept_fraction": 0.25, "completions/mean_length": 12.0}), (2, {"loss": 0.25})])
        bar.on_train_end(ARGS, TrainerState(max_steps=2), None)
    _, err = capsys.readouterr()
    assert "\r" not in err
    lines = err.splitlines()
    assert all(re.fullmatch(r"\[opsd all s0\] step \d/2, \d\d:\d\d elapsed, .* left(, loss=.*)?", line) for line in lines)
    assert lines[-1].startswith("[opsd all s0] step 2/2, ") and lines[-1].endswith("loss=0.25, kept=0.25, len=12")
    assert console._style[0] is console.PROGRESS_STYLES["bar"]  # after the block, as before it


def test_an_sft_run_logs_to_metrics_jsonl_not_to_stdout(tmp_path, task, tokenizer, capsys):
    _tiny_sft(task, tokenizer, tmp_path / "sft", max_steps=3)
    out, err = capsys.readouterr()
    assert "{'loss'" not in out and "'loss':" not in out
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "train_loss" in records[-1] and "train_runtime" in records[-1]
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    assert re.search(rf"sft: 100%.*3/3.*loss={last_loss:.3g}", err)


def test_a_resumed_sft_run_says_from_which_checkpoint(tmp_path, task, tokenizer, capfd, caplog):
    stage = tmp_path / "sft"
    _tiny_sft(task, tokenizer, stage, max_steps=2, save_steps=2)
    capfd.readouterr()
    _tiny_sft(task, tokenizer, stage, max_steps=3, save_steps=2)
    out, err = capfd.readouterr()
    assert "[sft] resumed from checkpoint-2 (step 2 of 3)" in out.splitlines()
    # The tied LM head is stored once, with the embedding: its key is not missing from the checkpoint.
    assert "missing keys" not in out + err + caplog.text
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # the resumed run trained step 3 only


def test_a_key_truly_missing_from_a_checkpoint_is_still_warned_about(tmp_path, task, tokenizer, capfd, caplog):
    from safetensors.torch import load_file, save_file

    stage = tmp_path / "sft"
    _tiny_sft(task, tokenizer, stage, max_steps=2, save_steps=2)
    weights = stage / "checkpoints" / "checkpoint-2" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    capfd.readouterr()
    _tiny_sft(task, tokenizer, stage, max_steps=3, save_steps=2)
    out, err = capfd.readouterr()
    assert "There were missing keys in the checkpoint model loaded: ['model.norm.weight']." in out + err + caplog.text


def test_rlvr_and_opsd_bars_show_their_keys(tmp_path, tiny_folder, task, capsys):
    from opsd_helpers import EXACT

    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig
    from opsdlab.stages.opsd import run_opsd
    from opsdlab.stages.rlvr import run_rlvr

    model, tokenizer = load_policy(tiny_folder)
    rlvr = RLVRStageConfig(max_steps=1, prompts_per_step=2, group_size=2, max_completion_length=8, logging_steps=1,
                           save_steps=100)
    run_rlvr(model, tokenizer, task.examples("train", 4), EXACT, rlvr, tmp_path / "rlvr", thinking=True)
    opsd = OPSDStageConfig(gate="all", max_steps=1, prompts_per_step=2, rollouts_per_prompt=2,
                           max_completion_length=8, logging_steps=1, save_steps=100)
    run_opsd(model, tokenizer, task.examples("train", 4), EXACT, opsd, tmp_path / "all-s0", thinking=True,
             label=stage_label("opsd", "all", 0))
    out, err = capsys.readouterr()
    assert "'loss':" not in out
    assert re.search(r"rlvr: 100%.*1/1.*loss=[-0-9.e]+, reward=[0-9.e]+, len=[0-9.e]+", err)
    assert re.search(r"opsd all s0: 100%.*1/1.*loss=[-0-9.e]+, kept=1, len=[0-9.e]+", err)
