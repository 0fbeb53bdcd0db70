"""A value that a stage (TRL, transformers, torch) would refuse once it runs is refused when the config
is built: before any model loads, in the pipeline and in the stage commands alike."""

import math
import time
import typing

import pytest

from opsdlab.run import budget_steps, eval_steps, train_steps
from opsdlab.cli import main
from opsdlab.config import ConfigError, load_config
from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig, SFTStageConfig

STAGES = {"sft": SFTStageConfig, "rlvr": RLVRStageConfig, "opsd": OPSDStageConfig}


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for module, name in ((train_steps, "load_policy"), (train_steps, "build_tiny_model"),
                         (eval_steps, "load_for_eval"), (budget_steps, "load_for_eval")):
        monkeypatch.setattr(module, name, refuse)


def test_a_negative_learning_rate_stops_the_demo_at_once(tmp_path, capsys, no_model_loads):
    start = time.time()
    assert main(["demo", "--run-dir", str(tmp_path / "run"), "opsd.learning_rate=-1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("opsdlab demo: error: opsd: learning_rate must be > 0 (torch's AdamW refuses a "
                                   "negative one, and 0 trains nothing), got -1")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert time.time() - start < 10


@pytest.mark.parametrize("override, message", [
    ("sft.weight_decay=-0.1", "sft: weight_decay must be >= 0"),
    ("sft.warmup_ratio=1.5", "sft: warmup_ratio must be in [0, 1]"),
    ("sft.save_steps=0", "sft: save_steps must be >= 1"),
    ("sft.max_length=0", "sft: max_length must be >= 1"),
    ("rlvr.warmup_steps=-1", "rlvr: warmup_steps must be >= 0"),
    ("rlvr.top_p=0", "rlvr: top_p must be in (0, 1]"),
    ("rlvr.top_p=1.5", "rlvr: top_p must be in (0, 1]"),
    ("rlvr.temperature=0", "rlvr: temperature must be > 0"),
    ("rlvr.beta=-0.1", "rlvr: beta must be >= 0"),
    ("rlvr.num_iterations=0", "rlvr: num_iterations must be >= 1"),
    ("rlvr.lr_scheduler_type=reduce_lr_on_plateau", "rlvr: lr_scheduler_type must be one of ['constant'"),
    ("rlvr.lr_scheduler_type=cosine_with_min_lr", "rlvr: lr_scheduler_type must be one of ['constant'"),
    ("opsd.logging_steps=0", "opsd: logging_steps must be >= 1"),
    ("opsd.ema_rate=0", "opsd: ema_rate must be in (0, 1]"),
    ("opsd.contrast_floor=1", "opsd: contrast_floor must be < 0 or null"),
    ("opsd.lora_alpha=0", "opsd: lora_alpha must be >= 1"),
    ("opsd.learning_rate=.inf", "opsd: learning_rate must be a finite number, got inf"),
    ("opsd.contrast_weight=.nan", "opsd: contrast_weight must be a finite number, got nan"),
    ("arms=[{name: x, learning_rate: -1}]", "arms.x: learning_rate must be > 0"),
    ("opsd.supervised_tokens=0", "opsd: supervised_tokens must be >= 1 or null"),
    ("opsd.position_floor=1.5", "opsd: position_floor must be in [0, 1]"),
    ("opsd.margin_window=0", "opsd: margin_window must be >= 1"),
    ("opsd.anchor_beta=-0.1", "opsd: anchor_beta must be >= 0"),
    ("opsd.position_weighting=cosine", "opsd: position_weighting must be one of ['linear', 'margin_cut', 'none']"),
    # Combinations that would silently do nothing.
    ("opsd.supervised_tokens=192", "opsd: supervised_tokens (192) >= max_completion_length (192) supervises every "
                                   "token"),
    ("arms=[{name: x, position_weighting: margin_cut, supervised_tokens: 4}]",
     "arms.x: margin_window (8) exceeds the 4 supervised tokens of a rollout, so margin_cut never cuts"),
])
def test_a_value_a_stage_would_refuse_is_refused_by_the_config(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [override])
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("command", ["sft", "rlvr", "opsd"])
def test_the_stage_commands_refuse_it_before_the_model_loads(tmp_path, capsys, command):
    """The model folder does not even exist: the config is refused first."""
    code = main([command, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "learning_rate=-1"])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(
        f"opsdlab {command}: error: learning_rate must be > 0 (torch's AdamW refuses a negative one")


def test_a_batch_that_does_not_split_is_refused_by_a_stage_command_before_the_model_loads(tmp_path, capsys):
    code = main(["rlvr", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "prompts_per_step=3",
                 "group_size=2", "gradient_accumulation_steps=4"])
    assert code == 2
    assert capsys.readouterr().err.startswith("opsdlab rlvr: error: prompts_per_step (3) x rollouts per prompt (2) = 6 "
                                              "rows per optimizer step do not split evenly")


def _numbers(cls) -> list[tuple[str, type]]:
    """The int and float fields of a stage config (optional ones included), with their number type."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        kinds = set(typing.get_args(hint) or (hint,)) - {type(None)}
        if kinds & {int, float} and bool not in kinds:
            found.append((name, float if float in kinds else int))
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_every_number_of_a_stage_config_has_a_range(stage):
    """The survey, kept: every numeric field refuses a value far outside any sensible range (a negative
    one, or for the only field that is a negative number, a positive one) and, for a float, NaN."""
    cls = STAGES[stage]
    for name, kind in _numbers(cls):
        bad = [1 if name == "contrast_floor" else -10**6] + ([math.nan] if kind is float else [])
        for value in bad:
            with pytest.raises(ValueError):
                cls(**{name: kind(value)})
                pytest.fail(f"{stage}.{name}={value} was accepted")


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                      "polynomial", "inverse_sqrt"])
def test_every_schedule_the_configs_accept_builds_in_transformers(tmp_path, schedule):
    import torch
    from transformers import get_scheduler

    from opsdlab.config.ranges import LR_SCHEDULERS
    from opsdlab.stages.sft import sft_args

    assert schedule in LR_SCHEDULERS
    args = sft_args(SFTStageConfig(lr_scheduler_type=schedule), tmp_path, 0, "<eos>", num_processes=1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                  num_training_steps=args.max_steps)


def test_the_accepted_bounds_build_trl_arguments(tmp_path):
    """The edge of each range is a value TRL and transformers take."""
    from opsdlab.stages.opsd import opsd_args
    from opsdlab.stages.rlvr import grpo_args
    from opsdlab.stages.sft import sft_args

    edge = dict(warmup_steps=0, top_p=1.0, beta=0.0, epsilon=0.0, epsilon_high=0.0, num_iterations=1, save_steps=1,
                logging_steps=1, max_completion_length=1, prompts_per_step=2, group_size=2)
    grpo_args(RLVRStageConfig(**edge), tmp_path, 0, num_processes=1)
    opsd_args(OPSDStageConfig(ema_rate=1.0, save_steps=1, logging_steps=1, max_completion_length=1, prompts_per_step=2,
                              rollouts_per_prompt=1), tmp_path, 0, num_processes=1)
    sft_args(SFTStageConfig(warmup_ratio=1.0, weight_decay=0.0, max_length=1, save_steps=1, logging_steps=1), tmp_path,
             0, "<eos>", num_processes=1)
