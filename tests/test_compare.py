"""The method comparison of a report: Pareto front, budget grid, arms' methods, training cost."""

import json

from opsdlab.report.compare import (arm_and_method, arm_methods, budget_curves, budget_grid, pareto_front, plane_points,
                             training_cost)
from opsdlab.evaluation.metrics.samples import Sample


def test_the_pareto_front_keeps_what_nothing_beats_on_both_accuracy_and_length():
    points = {"rlvr": (0.50, 40.0), "a": (0.50, 30.0), "b": (0.60, 45.0), "c": (0.40, 30.0), "d": (0.55, 35.0),
              "e": (0.50, 30.0)}
    # a and e tie (neither is strictly better), both beat rlvr and c; b is the most accurate; d is between
    assert pareto_front(points) == {"a", "e", "b", "d"}
    assert pareto_front({"only": (0.1, 9.0)}) == {"only"}


def test_a_checkpoint_label_names_its_arm_and_method():
    config = {"opsd": {"method": "opsd"}, "arms": [{"name": "correct", "gate": "correct"},
                                                   {"name": "crisp", "method": "crisp"},
                                                   {"name": "forced", "method": "budget"}]}
    assert arm_methods(config) == {"correct": "opsd", "crisp": "crisp", "forced": "budget"}
    assert arm_and_method(config, "crisp") == ("crisp", "crisp")
    assert arm_and_method(config, "forced-q50") == ("forced", "budget")
    assert arm_and_method(config, "forced-b64") == ("forced", "budget")
    assert arm_and_method({"arms": [{"name": "x"}]}, "x") == ("x", "opsd")  # a config of before methods


def test_the_budget_grid_spans_the_lengths_evenly():
    assert budget_grid([10, 32], points=12) == [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]
    assert budget_grid([5, 5, 5]) == [5]
    assert budget_grid([]) == []


def test_budget_curves_share_one_grid():
    def sample(pid, correct, tokens):
        return Sample(problem_id=pid, sample_index=0, correct=correct, answer="1", response_tokens=tokens,
                      thinking_tokens=tokens, truncated=False)

    grid, curves = budget_curves({"long": [sample("p", True, 30), sample("q", True, 40)],
                                  "short": [sample("p", True, 10), sample("q", False, 12)]})
    assert grid[0] == 10 and grid[-1] == 40
    assert curves["long"]["10"] == 0.0 and curves["long"]["40"] == 1.0
    assert curves["short"]["10"] == 0.5 and curves["short"]["40"] == 0.5


def test_training_cost_reads_the_stage_line_and_trls_token_count(tmp_path):
    (tmp_path / "summary.jsonl").write_text(
        json.dumps({"kind": "stage", "stage": "opsd-a-s0", "seconds": 14.0}) + "\n"
        + json.dumps({"kind": "eval", "checkpoint": "opsd-a-s0", "seconds": 3.0}) + "\n")
    folder = tmp_path / "opsd" / "a-s0"
    folder.mkdir(parents=True)
    folder.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 5, "num_tokens": 100.0}, {"step": 10, "num_tokens": 230.0}, {"step": 10, "train_runtime": 1.0})))
    assert training_cost(tmp_path, "opsd-a-s0") == {"seconds": 14.0, "tokens": 230.0}
    assert training_cost(tmp_path, "opsd-b-s0") == {"seconds": None, "tokens": None}


def test_the_plane_has_the_start_and_every_arm():
    change = {"accuracy_before": 0.4, "mean_length_before": 50.0, "accuracy_after": 0.45, "mean_length_after": 40.0}
    points = plane_points("rlvr", [{"label": "a", "change": change}])
    assert points == {"rlvr": (0.4, 50.0), "a": (0.45, 40.0)}
    assert pareto_front(points) == {"a"}
