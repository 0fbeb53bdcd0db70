"""The OPSD-versus-GRPO step cost benchmark (`benchmarks/opsd_step_cost.py`) at the tests' tiny shape.

It drives the project's real trainers, so a change to either trainer that breaks the benchmark fails
here rather than at the next measurement.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "opsd_step_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("opsd_step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_turns_alternate_which_stage_goes_first(bench):
    assert bench.turn_order(3) == ["opsd", "grpo", "grpo", "opsd", "opsd", "grpo"]


def test_flop_counter_counts_in_place_products_and_splits_by_phase(bench):
    """addmm_ (TRL's CPU gradient accumulation) is counted like addmm: 2 x 3 x 4 x 5 = 120 FLOPs."""
    acc, a, b = torch.zeros(3, 5), torch.randn(3, 4), torch.randn(4, 5)
    counter = bench.flop_counter({})
    with counter:
        acc.addmm_(a, b)
        with torch.no_grad():
            a @ b
    summary = counter.summary()
    assert summary["total"] == 240
    assert summary["by_op"] == {"addmm_": {"forward": 120}, "mm": {"forward_grad_off": 120}}
    assert summary["uncounted_ops"] == {}


def test_measure_runs_both_trainers_on_one_batch(bench, tmp_path):
    settings = bench.Settings(shape="tiny", layers=1, prompts=2, rollouts=2, completion=4, steps=1, dtype="float32")
    result = bench.measure(settings, tmp_path, log=lambda line: None)
    opsd, grpo = result["stages"]["opsd"], result["stages"]["grpo"]
    # One warm-up (counted) step and one measured step each, alternating; fixed-length rollouts.
    assert result["order"] == ["opsd", "grpo", "grpo", "opsd"]
    assert result["batch"]["completion_tokens"] == [4]
    assert len(opsd["non_generation_seconds"]) == len(grpo["non_generation_seconds"]) == 1
    assert opsd["generated_tokens"] == grpo["generated_tokens"] == [2 * 2 * 4]
    # The same batch: the student's backbone does the same work in both stages, forward and backward.
    assert opsd["flops_by_module"]["student.model"] == grpo["flops_by_module"]["student.model"]
    # OPSD adds the teacher's forward, which runs without gradients on the teacher copy.
    assert set(opsd["flops_by_module"]["teacher.model"]) == {"forward_grad_off"}
    assert "teacher.model" not in grpo["flops_by_module"]
    assert opsd["uncounted_ops"] == grpo["uncounted_ops"] == {}
    head = result["head_gemm_seconds"]
    assert head["rows"] == 2 * 2 * 4 and head["bf16_output"] > 0 and head["float32"] > 0
    # The frozen teacher is a copy of the weights (its buffers may differ by a few bytes).
    assert opsd["memory_parts_bytes"]["teacher_kept_apart"] == pytest.approx(opsd["memory_parts_bytes"]["weights"],
                                                                             rel=0.01)
    assert grpo["memory_parts_bytes"]["teacher_kept_apart"] == 0
    teacher = result["teacher_forward"]["total"]
    assert result["bound_ratio"] == pytest.approx((grpo["flops"] + teacher) / grpo["flops"])
    assert result["flops_ratio"] == pytest.approx(opsd["flops"] / grpo["flops"])
    for key in ("wall_ratio_non_generation", "generation_ratio", "peak_memory_ratio"):
        assert result[key] > 0


def test_command_line_refuses_fewer_than_three_measured_steps(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--steps", "2"])
    assert "--steps must be >= 3" in capsys.readouterr().err
