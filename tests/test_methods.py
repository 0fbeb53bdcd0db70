"""Compaction methods as a named choice of an arm: settings, validation, the steps a pipeline plans."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from opsdlab.config import ConfigError, load_config
from opsdlab.config.methods import METHODS
from opsdlab.stages.methods import TRAINING, length_rl_config
from opsdlab.run.budget_steps import budget_tokens
from opsdlab.run.outputs import run_outputs
from opsdlab.run.plan import Step, budget_points, pipeline_steps

ARMS = ("arms=[{name: opsd, gate: correct}, {name: crisp, method: crisp}, {name: dler, method: length_rl}, "
        "{name: contrast, method: contrastive}, {name: forced, method: budget}]")


def arms_of(config):
    return {arm.name: config.arm_config(arm) for arm in config.arms}


def test_a_method_sets_its_defaults_and_the_arm_overrides_them():
    config = load_config("tiny", [ARMS])
    arms = arms_of(config)
    assert [arms[name].method for name in arms] == ["opsd", "crisp", "length_rl", "contrastive", "budget"]
    crisp = arms["crisp"]
    assert (crisp.teacher_context, crisp.divergence, crisp.gate, crisp.teacher_weights) == \
        ("concise", "reverse_kl", "all", "periodic")
    assert arms["contrast"].gate == config.opsd.gate  # contrastive differs from OPSD only by the contrast
    own = arms_of(load_config("tiny", ["arms=[{name: c, method: crisp, gate: correct, teacher_refresh_steps: 7}]"]))
    assert (own["c"].gate, own["c"].teacher_refresh_steps, own["c"].teacher_context) == ("correct", 7, "concise")


def test_the_rlcsd_plugin_variant_sets_the_released_settings_and_the_arm_overrides_them():
    """`contrast_variant: rlcsd_plugin` on the GPU preset: the RLCSD authors' opsd_ectr configuration (a
    correct sibling against an incorrect one, every rollout, forward KL clipped at 0.05, top 100 plus a
    tail, tokens weighted with tau 1, a = 0.5, floor -5), whatever the preset's opsd section says."""
    group = "prompts_per_step: 4, rollouts_per_prompt: 8, gradient_accumulation_steps: 8"
    config = load_config("qwen3-1.7b", [f"arms=[{{name: c, method: contrastive, contrast_variant: rlcsd_plugin, {group}}}, "
                                        f"{{name: o, method: contrastive, contrast_variant: rlcsd_plugin, {group}, "
                                        "gate: correct, teacher_context: solution}]"])
    arms = arms_of(config)
    c = arms["c"]
    assert (config.opsd.gate, config.opsd.teacher_context, config.opsd.divergence) == ("correct", "solution", "reverse_kl")
    assert (c.teacher_context, c.gate, c.divergence, c.clip_tau, c.top_k) == ("sibling", "all", "forward_kl", 0.05, None)
    assert (c.contrast_top_k, c.contrast_token_tau, c.contrast_weight, c.contrast_floor, c.contrast_anchor) == \
        (100, 1.0, 0.5, -5.0, "reference")
    assert (c.teacher_weights, c.learning_rate, c.rollouts_per_prompt) == ("frozen", 1e-6, 8)
    assert (arms["o"].gate, arms["o"].teacher_context, arms["o"].divergence) == ("correct", "solution", "forward_kl")
    # the default variant is the unrelated-solution contrast, with no defaults of its own
    plain = arms_of(load_config("tiny", [ARMS]))["contrast"]
    assert (plain.contrast_variant, plain.teacher_context, plain.divergence) == ("unrelated_solution", "solution",
                                                                                 "reverse_kl")


@pytest.mark.parametrize("arm, message", [
    ("{name: a, method: distill}", "arms.a: method must be one of ['budget', 'contrastive', 'crisp', 'length_rl', 'opsd']"),
    ("{name: a, method: length_rl, rollouts_per_prompt: 1}", "arms.a: method length_rl is group-relative RL"),
    ("{name: a, method: contrastive, contrast_context: solution}", "arms.a: contrast_context must differ"),
    ("{name: a, method: contrastive, contrast_variant: rlcsd}", "arms.a: contrast_variant must be one of "
                                                               "['rlcsd_plugin', 'unrelated_solution'], got 'rlcsd'"),
    ("{name: a, method: contrastive, contrast_variant: rlcsd_plugin, rollouts_per_prompt: 1}",
     "arms.a: contrast_variant rlcsd_plugin contrasts sibling rollouts of a problem; it needs rollouts_per_prompt >= 2"),
    ("{name: a, method: contrastive, contrast_variant: rlcsd_plugin, teacher_context: answer}",
     "arms.a: contrast_variant rlcsd_plugin shows the incorrect sibling in the reference-solution block; "
     "teacher_context must be one of ['sibling', 'solution'], got 'answer'"),
    ("{name: a, method: contrastive, contrast_variant: rlcsd_plugin, top_k: 20}", "arms.a: contrast_variant "
     "rlcsd_plugin brings its own support (contrast_top_k tokens plus a tail); top_k must be null"),
    ("{name: a, method: contrastive, contrast_variant: rlcsd_plugin, divergence: sampled_reverse_kl}",
     "arms.a: contrast_variant rlcsd_plugin compares distributions on a support"),
    ("{name: a, method: contrastive, contrast_top_k: 0}", "arms.a: contrast_top_k must be >= 1, got 0"),
    ("{name: a, method: contrastive, contrast_token_tau: 0}", "arms.a: contrast_token_tau must be a number > 0 or null"),
    ("{name: a, method: length_rl, length_reward: cosine}", "arms.a: length_reward must be one of"),
    ("{name: a, method: budget, budgets: [0]}", "budgets must be positive token counts"),
])
def test_bad_method_settings_are_errors_naming_the_arm(arm, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [f"arms=[{arm}]"])


def test_length_rl_runs_rl_with_the_arms_budget_and_dlers_settings():
    config = load_config("tiny", [ARMS, "opsd.max_steps=7", "opsd.rollouts_per_prompt=4", "rlvr.epsilon_high=0.3"])
    rl = length_rl_config(arms_of(config)["dler"], config.rlvr)
    assert (rl.max_steps, rl.group_size, rl.prompts_per_step) == (7, 4, config.opsd.prompts_per_step)
    assert length_rl_config(arms_of(load_config("tiny", [ARMS, "opsd.max_rollout_tokens=900"]))["dler"],
                            config.rlvr).max_rollout_tokens == 900
    assert (rl.scale_rewards, rl.dynamic_sampling, rl.epsilon_high) == ("batch", True, 0.3)
    assert rl.learning_rate == config.opsd.learning_rate and rl.loss_type == config.rlvr.loss_type


def test_the_pipeline_plans_training_for_trained_methods_and_budget_evaluations_for_budget_forcing(tmp_path):
    config = load_config("tiny", [ARMS, f"run_dir={tmp_path}"])
    steps = {step.name: step for step in pipeline_steps(config, tmp_path / "base" / "model")}
    for arm in ("opsd", "crisp", "dler", "contrast"):
        assert steps[f"train opsd-{arm}-s0"].kind == "opsd"
    assert not any(name.startswith("train opsd-forced") for name in steps)
    forced = [step for step in steps.values() if step.kind == "budget"]
    assert [step.checkpoint for step in forced] == ["opsd-forced-q25-s0", "opsd-forced-q50-s0", "opsd-forced-q75-s0"]
    # the quantile budgets read the start's lengths on training problems, measured once, not its evaluations
    lengths = steps["lengths forced"]
    assert (lengths.kind, lengths.source, lengths.after) == ("lengths", "rlvr", ("train rlvr",))
    assert all(step.source == "rlvr" and step.after == ("train rlvr", "lengths forced") for step in forced)
    assert forced[1].budget == ("quantile", 0.5)
    # the teacher prompts checked first are those of methods that read a teacher: solution (opsd,
    # contrastive) and concise (crisp), not length_rl's or budget's
    assert sorted(name for name in steps if name.startswith("check ")) == ["check rlvr concise", "check rlvr solution"]


def test_each_methods_outputs_record_what_shapes_them(tmp_path):
    config = load_config("tiny", [ARMS, f"run_dir={tmp_path}"])
    outputs = {output.folder.relative_to(tmp_path).as_posix(): output for output in run_outputs(config)}
    dler = outputs["opsd/dler-s0"].record["settings"]
    assert dler["opsd.method"] == "length_rl" and dler["rlvr.loss_type"] == config.rlvr.loss_type
    assert "rlvr.loss_type" not in outputs["opsd/opsd-s0"].record["settings"]
    forced = outputs["eval/opsd-forced-q50-s0/synthetic"]
    assert forced.record["settings"]["budget.quantile"] == 0.5
    assert forced.record["settings"]["budget.quantile_of"] == "train"
    assert forced.reads == tmp_path / "rlvr" and "lengths forced" in forced.after
    lengths = outputs["budget/forced"]
    assert (lengths.step, lengths.kind, lengths.reads, lengths.after) == ("lengths forced", "eval", tmp_path / "rlvr",
                                                                         ("train rlvr",))
    assert lengths.record["settings"]["budget.train_problems"] == 64
    assert lengths.record["settings"]["eval.sampling.k"] == config.eval.sampling.k


def test_explicit_budgets_name_their_evaluations_by_tokens(tmp_path):
    config = load_config("tiny", ["arms=[{name: f, method: budget, budgets: [16, 48]}]", f"run_dir={tmp_path}"])
    assert budget_points(arms_of(config)["f"]) == [("b16", ("tokens", 16)), ("b48", ("tokens", 48))]
    steps = pipeline_steps(config, tmp_path / "base" / "model")
    assert not any(step.kind == "lengths" for step in steps)  # nothing to measure


def test_a_quantile_budget_reads_the_starting_checkpoints_lengths_on_training_problems(tmp_path):
    from opsdlab.run.budget_steps import budget_source

    folder = tmp_path / "budget" / "f"
    folder.mkdir(parents=True)
    folder.joinpath("samples.jsonl").write_text("".join(
        json.dumps({"problem_id": f"train-{n}", "sample_index": 0, "correct": False, "answer": None,
                    "response_tokens": n, "thinking_tokens": n, "truncated": False}) + "\n" for n in (10, 20, 30, 40, 50)))
    step = Step("eval opsd-f-q25-s0", "budget", "opsd-f-q25-s0", "m", arm="f", source="rlvr",
                budget=("quantile", 0.25))
    assert budget_tokens(tmp_path, step) == 20  # linear quantile of 10..50 at 0.25
    assert budget_source(tmp_path, step) == ("the 0.25 quantile of rlvr's 5 response lengths on 5 training problems "
                                             "in budget/f")
    tokens = Step("x", "budget", "x", "m", arm="f", source="rlvr", budget=("tokens", 33))
    assert budget_tokens(tmp_path, tokens) == 33 and budget_source(tmp_path, tokens) == "given in tokens (budgets)"
    with pytest.raises(ConfigError, match="arms.g: budget_quantiles read the lengths of rlvr on training problems"):
        budget_tokens(tmp_path, replace(step, arm="g"))


def test_every_method_is_described():
    assert all(method.summary for method in METHODS.values())
    assert {name for name in METHODS if TRAINING[name] is None} == {"budget"}


def test_the_methods_study_runs_opsd_against_every_other_method(tmp_path):
    from opsdlab.run.study import study_config

    config = study_config("tiny", tmp_path, seeds=(0,), arms="methods")
    assert {config.arm_config(arm).method for arm in config.arms} == set(METHODS)
    with pytest.raises(ConfigError, match="--arms: expected one of gates, methods, .*got 'all'"):
        study_config("tiny", tmp_path, arms="all")


@pytest.mark.parametrize("preset, steps, per_rollout", [("tiny", 20, 42), ("tiny-search", 25, 38)])
def test_the_methods_study_runs_every_arm_at_one_rollout_token_budget(tmp_path, preset, steps, per_rollout):
    """The budget is what the default OPSD arm spends (its steps x 8 prompts x 4 rollouts of the preset's
    mean rollout length); max_steps is only a bound, 3x the preset's; CRISP refreshes at least twice even
    where its rollouts are twice that length, and an arm whose rollouts shorten to a third still reaches
    the budget within max_steps."""
    from opsdlab.run.study import study_config

    config = study_config(preset, tmp_path, seeds=(0,), arms="methods")
    budget = steps * 8 * 4 * per_rollout
    arms = {arm.name: config.arm_config(arm) for arm in config.arms}
    assert {(a.max_rollout_tokens, a.max_steps) for a in arms.values()} == {(budget, 3 * steps)}
    crisp = arms["crisp"]
    rollouts = crisp.prompts_per_step * crisp.rollouts_per_prompt
    assert crisp.teacher_weights == "periodic"
    assert budget // (rollouts * 2 * per_rollout) >= 2 * crisp.teacher_refresh_steps
    assert budget / (rollouts * per_rollout / 3) <= crisp.max_steps
    assert study_config(preset, tmp_path, seeds=(0,)).opsd.max_rollout_tokens is None  # the gates study: none
    own = study_config(preset, tmp_path, seeds=(0,), arms="methods", overrides=["opsd.max_rollout_tokens=1000"])
    assert own.arm_config(own.arms[0]).max_rollout_tokens == 1000


def test_a_sharded_budget_evaluation_counts_every_shares_forced_responses(monkeypatch):
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.evaluation import evaluate as evaluation
    from opsdlab.evaluation.metrics.samples import Sample

    def fake_evaluate(model, tokenizer, share, verifier, sampling, **kwargs):
        samples = [Sample(problem_id=p, sample_index=0, correct=True, answer="1", response_tokens=10 * (i + 1),
                          thinking_tokens=0, truncated=False) for i, p in enumerate(share)]
        return samples, {"forced_samples": len(share), "budget": kwargs["budget"]}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluation, "shard_and_gather", lambda items, work: [work(items[:2], 0), work(items[2:], 1)])
    _, summary = evaluation.evaluate_sharded(None, None, ["a", "b", "c"], None, SamplingConfig(k=1), budget=25,
                                             budgets=[15])
    assert summary["forced_samples"] == 2 + 1 and summary["budget"] == 25
    assert summary["accuracy_at_budget"] == {"15": 2 / 3}  # a (10) and c (10) within 15, b (20) not


def test_a_pipeline_with_every_method_evaluates_every_arm_and_reports_them_side_by_side(tmp_path, capsys):
    """The five methods from one RLVR checkpoint, at the smallest sizes and a rollout-token budget that
    the first step reaches: each arm (each budget of the budget arm) has its evaluation with the budget
    metrics, each trained arm ends at step 1 of 2 and says so, and the report compares them with what
    each spent."""
    import yaml

    from opsdlab.run.pipeline import run_pipeline
    from opsdlab.report import write_report
    from test_pipeline import TINY_RUN

    run = {**TINY_RUN, "run_dir": str(tmp_path / "run"), "workers": 1,
           "opsd": {**TINY_RUN["opsd"], "max_steps": 2, "save_steps": 100, "max_rollout_tokens": 1},
           "eval": {**TINY_RUN["eval"], "greedy": False},
           "arms": [{"name": "opsd", "gate": "all"}, {"name": "crisp", "method": "crisp"},
                    {"name": "dler", "method": "length_rl", "length_target": 8},
                    {"name": "contrast", "method": "contrastive", "gate": "all"},
                    {"name": "forced", "method": "budget", "budgets": [6]}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run))
    run_dir = run_pipeline(load_config(path))
    for checkpoint in ("opsd-opsd-s0", "opsd-crisp-s0", "opsd-dler-s0", "opsd-contrast-s0", "opsd-forced-b6-s0"):
        summary = json.loads((run_dir / "eval" / checkpoint / "synthetic" / "summary.json").read_text())
        assert "accuracy_at_budget" in summary and "tokens_after_first_correct" in summary, checkpoint
    forced = json.loads((run_dir / "eval" / "opsd-forced-b6-s0" / "synthetic" / "summary.json").read_text())
    assert forced["budget"] == 6 and not (run_dir / "opsd" / "forced-s0").exists()
    assert json.loads((run_dir / "opsd" / "dler-s0" / "length_target.json").read_text())["target"] == 8
    printed = capsys.readouterr().out
    report = write_report(run_dir).read_text()
    assert "### Compaction methods against the start" in report
    for row in ("| opsd | opsd |", "| crisp | crisp |", "| dler | length_rl |", "| contrast | contrastive |",
                "| forced-b6 (B=6) | budget |"):
        assert row in report
    for arm in ("opsd", "crisp", "dler", "contrast"):
        spent = json.loads((run_dir / "opsd" / f"{arm}-s0" / "rollout_tokens.json").read_text())
        assert (spent["steps"], spent["max_steps"], spent["ended"]) == (1, 2, "budget"), arm
        assert f"ended at the rollout-token budget: {spent['rollout_tokens']:,} rollout tokens (budget 1) at step 1" \
            in next(line for line in printed.splitlines() if f"[opsd {arm} s0] done" in line), arm
        cells = [c.strip() for c in next(line for line in report.splitlines()
                                         if line.startswith(f"| {arm} |")).split("|")]
        assert cells[-4:-2] == [f"{spent['rollout_tokens']:,}", "1"], arm  # rollout tokens, steps
    assert (run_dir / "report" / "budgets_synthetic.png").exists()


def test_the_gpu_presets_commented_method_arms_load_and_its_contrast_arm_is_the_rlcsd_plugin():
    import yaml

    text = (Path(__file__).parents[1] / "src" / "opsdlab" / "configs" / "qwen3-1.7b.yaml").read_text()
    block = text.split("# Compaction methods side by side")[1].splitlines()[2:]
    arms = yaml.safe_load("\n".join(line[1:] for line in block if line.startswith("#  ")))
    config = load_config("qwen3-1.7b", [f"arms={json.dumps(arms)}"])
    config.check_batches(1)
    built = arms_of(config)
    assert [arm.method for arm in built.values()] == ["opsd", "crisp", "contrastive", "length_rl", "budget"]
    contrast = built["contrast"]
    assert (contrast.contrast_variant, contrast.rollouts_per_prompt, contrast.gate) == ("rlcsd_plugin", 8, "all")


def test_a_pipelines_quantile_budget_comes_from_training_problems_not_the_evaluated_ones(tmp_path, capsys):
    """A budget arm with a quantile budget from the tiny base model: its lengths are measured on training
    problems (budget/<arm>/), the budget is their quantile, and the evaluation says where it came from."""
    import numpy
    import yaml

    from opsdlab.evaluation.evaluate import read_samples
    from opsdlab.run.pipeline import run_pipeline
    from opsdlab.tasks import build_task
    from test_pipeline import TINY_RUN

    run = {**TINY_RUN, "run_dir": str(tmp_path / "run"), "workers": 1, "stages": ["opsd"],
           "opsd": {**TINY_RUN["opsd"], "train_problems": 6},
           "eval": {**TINY_RUN["eval"], "greedy": False, "base": False,
                    "sampling": {**TINY_RUN["eval"]["sampling"], "temperature": 1.0}},
           "arms": [{"name": "forced", "method": "budget", "budget_quantiles": [0.5]}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run))
    config = load_config(path)
    run_dir = run_pipeline(config)
    measured = read_samples(run_dir / "budget" / "forced" / "samples.jsonl")
    task = build_task("synthetic", {}, seed=config.seed)
    train_ids = [example.id for example in task.examples("train", 6)]
    evaluated = {example.id for example in task.examples("test", 4)}
    assert sorted({s.problem_id for s in measured}) == sorted(train_ids) and len(measured) == 6 * 2
    assert not evaluated & {s.problem_id for s in measured}
    summary = json.loads((run_dir / "eval" / "opsd-forced-q50-s0" / "synthetic" / "summary.json").read_text())
    assert summary["budget"] == max(1, round(float(numpy.quantile([s.response_tokens for s in measured], 0.5))))
    assert summary["budget_from"] == ("the 0.5 quantile of base's 12 response lengths on 6 training problems "
                                      "in budget/forced")
    out = capsys.readouterr().out
    assert f"[budget] forced: budgets q50 {summary['budget']} tokens, quantiles of base's 12 response lengths on 6 " \
           "training problems" in out
    assert "forced; the 0.5 quantile of base's 12 response lengths on 6 training problems in budget/forced)" in out


def test_study_preset_arms_keep_the_files_own_arms(tmp_path):
    """`--arms preset` runs the arms a config file writes, not one of the study's arm sets."""
    from opsdlab.run.study import study_config

    preset = tmp_path / "variants.yaml"
    preset.write_text("model: {init: tiny, size: tiny}\ntask: {name: synthetic}\n"
                      "arms:\n  - {name: first8, gate: all, supervised_tokens: 8}\n  - {name: plain, gate: all}\n")
    config = study_config(str(preset), tmp_path / "study", seeds=(0,), arms="preset")
    assert [arm.name for arm in config.arms] == ["first8", "plain"]
    assert [arm.name for arm in study_config(str(preset), tmp_path / "study", arms="gates").arms] != ["first8", "plain"]
