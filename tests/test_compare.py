"""The method comparison of a report: Pareto front, budget grid, arms' methods, training cost."""

import json

from opsdlab.report.compare import (arm_and_method, arm_methods, budget_curves, budget_grid, method_table, pareto_front,
                                    plane_points, seeds_methods_section, training_cost)
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


def test_training_cost_reads_the_stage_line_and_the_stages_rollout_tokens(tmp_path):
    (tmp_path / "summary.jsonl").write_text(
        json.dumps({"kind": "stage", "stage": "opsd-a-s0", "seconds": 14.0}) + "\n"
        + json.dumps({"kind": "eval", "checkpoint": "opsd-a-s0", "seconds": 3.0}) + "\n")
    folder = tmp_path / "opsd" / "a-s0"
    folder.mkdir(parents=True)
    # TRL's num_tokens (prompts and responses) is not what the arm's generation cost
    folder.joinpath("metrics.jsonl").write_text(json.dumps({"step": 10, "num_tokens": 230.0}) + "\n")
    folder.joinpath("rollout_tokens.json").write_text(json.dumps(
        {"rollout_tokens": 96, "steps": 3, "max_rollout_tokens": 70, "max_steps": 10, "ended": "budget"}))
    assert training_cost(tmp_path, "opsd-a-s0") == {"seconds": 14.0, "tokens": 96, "steps": 3}
    assert training_cost(tmp_path, "opsd-b-s0") == {"seconds": None, "tokens": None, "steps": None}


def test_the_method_tables_say_what_each_arm_spent_in_tokens_and_steps():
    change = {"accuracy_diff": 0.01, "accuracy_diff_ci": [-0.02, 0.04], "length_change": -0.1,
              "length_change_ci": [-0.15, -0.05], "aes": 0.2, "accuracy_before": 0.3, "mean_length_before": 40.0,
              "accuracy_after": 0.31, "mean_length_after": 36.0}
    rows = [{"label": "opsd", "checkpoint": "opsd-opsd-s0", "method": "opsd", "change": change, "overthinking": None, "overthinking_share": None,
             "tokens": 27012, "steps": 19, "seconds": 40.0},
            {"label": "dler", "checkpoint": "opsd-dler-s0", "method": "length_rl", "change": change, "overthinking": None, "overthinking_share": None,
             "tokens": 27100, "steps": 8, "seconds": 30.0},
            {"label": "forced-q50", "checkpoint": "opsd-forced-q50-s0", "method": "budget", "budget": 20, "change": change, "overthinking": None,
             "overthinking_share": None, "tokens": None, "steps": None, "seconds": None}]
    lines = method_table(rows, "rlvr")
    assert lines[0].endswith("| AES | rollout tokens | steps | train seconds |") and lines[1].count("---") == 9
    assert lines[2].endswith("| +0.200 | 27,012 | 19 | 40 |") and lines[3].endswith("| 27,100 | 8 | 30 |")
    assert lines[4].endswith("| 0 | 0 | 0 |")
    _, md = seeds_methods_section({0: rows[:2], 1: [{**rows[0], "tokens": 26990, "steps": 21}, rows[1]]},
                                  {0: "rlvr", 1: "rlvr"}, lambda seed, name: None, [0, 1], {}, "synthetic", None)
    header = next(line for line in md if line.startswith("| arm |"))
    assert header.endswith("| AES | rollout tokens | steps | train seconds |")
    opsd_row = next(line for line in md if line.startswith("| opsd |"))
    assert opsd_row.endswith("| 27,001 ± 16 | 20.0 ± 1.4 | 40 ± 0 |")


def test_the_plane_has_the_start_and_every_arm():
    change = {"accuracy_before": 0.4, "mean_length_before": 50.0, "accuracy_after": 0.45, "mean_length_after": 40.0}
    points = plane_points("rlvr", [{"label": "a", "change": change}])
    assert points == {"rlvr": (0.4, 50.0), "a": (0.45, 40.0)}
    assert pareto_front(points) == {"a"}
