"""Length-aware RLVR (the `length_rl` method): the truncation reward, the target length and a real step."""

import json

import pytest

from opsdlab.loss import rewards
from opsdlab.stages import rlvr
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import generate, response_length
from opsdlab.modeling.models import end_token_ids, load_policy
from opsdlab.tasks.prompts import render_prompt
from opsdlab.loss.rewards import LENGTH_REWARDS, LengthAwareReward, VerifierReward
from opsdlab.config.stages import RLVRStageConfig
from opsdlab.stages.rlvr import decide_length_target, quantile_length, run_rlvr
from opsdlab.modeling.runtime import read_jsonl
from opsdlab.tasks.verifier import VerifierConfig

SMALL = dict(max_steps=1, prompts_per_step=4, group_size=2, max_completion_length=16, learning_rate=1e-3,
             save_steps=100, logging_steps=1)


def test_truncation_reward_pays_only_correct_responses_within_the_target():
    reward = LENGTH_REWARDS["truncation"]
    assert reward(True, 5, 5, False) == 1.0  # at the target: inside
    assert reward(True, 6, 5, False) == 0.0  # one token over
    assert reward(False, 3, 5, False) == 0.0
    assert reward(True, 4, 5, True) == 1.0  # truncation itself does not enter


def test_length_aware_reward_grades_once_and_logs_correct_over_target():
    verifier = VerifierConfig(extract="last_boxed", compare="exact")
    reward = LengthAwareReward(verifier, {0}, "truncation", target=2)
    logged = {}
    scores = reward(prompts=[""] * 4, completions=["\\boxed{3}", "\\boxed{3}", "\\boxed{4}", "\\boxed{3}"],
                    completion_ids=[[5, 5, 0], [5, 5, 5], [5, 0], [5, 5, 5, 5]], answer=["3"] * 4,
                    log_metric=lambda k, v: logged.__setitem__(k, v))
    # lengths without the end token: 2, 3, 1, 4; correct: yes, yes, no, yes (the last one truncated)
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert isinstance(reward, VerifierReward) and reward.__name__ == "correct_truncation"
    assert reward.last_correct == [True, True, False, True]
    assert reward.last_truncated == [False, True, False, True]
    assert logged["rollouts/accuracy"] == 0.75
    assert logged["rollouts/correct_over_target"] == pytest.approx(2 / 3)
    logged.clear()
    reward(prompts=[""], completions=["no"], completion_ids=[[5, 0]], answer=["3"],
           log_metric=lambda k, v: logged.__setitem__(k, v))
    assert "rollouts/correct_over_target" not in logged  # no correct rollout: nothing to report


def test_length_aware_reward_refuses_unknown_names_and_empty_targets():
    with pytest.raises(ValueError, match=r"length_reward must be one of \['truncation'\], got 'cosine'"):
        LengthAwareReward(VerifierConfig(), {0}, "cosine", target=10)
    with pytest.raises(ValueError, match="length target must be a positive number of tokens, got 0"):
        LengthAwareReward(VerifierConfig(), {0}, "truncation", target=0)


def test_quantile_length_is_the_nearest_rank():
    lengths = [9, 3, 7, 5]
    assert [quantile_length(lengths, q) for q in (0.1, 0.25, 0.5, 0.51, 0.75, 1.0)] == [3, 3, 5, 7, 7, 9]
    assert quantile_length([4], 0.5) == 4
    with pytest.raises(ValueError, match="no response lengths"):
        quantile_length([], 0.5)


def _decide(model, tokenizer, examples, stage_dir, *, given=None, quantile=0.5, **config):
    return decide_length_target(model, tokenizer, examples, RLVRStageConfig(**{**SMALL, **config}), stage_dir,
                                reward="truncation", given=given, quantile=quantile, thinking=True, seed=0)


def test_target_is_the_quantile_of_the_starting_lengths(tmp_path, tiny_folder, task, monkeypatch, capsys):
    model, tokenizer = load_policy(tiny_folder)
    examples = task.examples("train", 10)
    monkeypatch.setattr(rlvr, "LENGTH_TARGET_PROBLEMS", 8)
    target = _decide(model, tokenizer, examples, tmp_path / "a", quantile=0.25)
    # The same sampling by hand: the first 8 problems, the stage's temperature and completion length.
    sampled = generate(model, tokenizer, [render_prompt(tokenizer, ex, thinking=True) for ex in examples[:8]],
                       SamplingConfig(k=1, temperature=1.0, max_new_tokens=16, seed=0))
    lengths = sorted(response_length(g, end_token_ids(tokenizer, model)) for g in sampled)
    assert target == lengths[1]  # ceil(0.25 x 8) = 2nd shortest
    assert lengths[1] < 16  # the tiny model ends some responses early, so the quantile is not the cap
    record = json.loads((tmp_path / "a" / "length_target.json").read_text())
    assert record["target"] == target and record["source"] == "quantile" and record["quantile"] == 0.25
    assert record["lengths"] == 8 and record["reward"] == "truncation"
    assert "rlvr: length target" in capsys.readouterr().out
    assert _decide(model, tokenizer, examples, tmp_path / "b", quantile=0.25) == target  # deterministic


def test_given_target_is_used_verbatim_and_nothing_is_sampled(tmp_path, tiny_folder, monkeypatch, capsys):
    model, tokenizer = load_policy(tiny_folder)
    monkeypatch.setattr(rlvr, "generate", lambda *a, **k: pytest.fail("a given target needs no sampling"))
    assert _decide(model, tokenizer, [], tmp_path, given=7) == 7
    record = json.loads((tmp_path / "length_target.json").read_text())
    assert record == {"target": 7, "source": "given", "quantile": None, "lengths": 0, "reward": "truncation"}
    assert "rlvr: length target 7 tokens, given (length_target)" in capsys.readouterr().out


def test_resumed_run_reuses_the_target_and_refuses_another(tmp_path, tiny_folder, monkeypatch):
    model, tokenizer = load_policy(tiny_folder)
    (tmp_path / "length_target.json").write_text(json.dumps({"target": 3, "source": "quantile", "quantile": 0.5,
                                                             "lengths": 64}))
    monkeypatch.setattr(rlvr, "generate", lambda *a, **k: pytest.fail("a resumed run must not measure again"))
    assert _decide(model, tokenizer, [], tmp_path, quantile=0.5) == 3
    with pytest.raises(ValueError, match=r"length_target.json: this stage trains toward target 3 \(quantile 0.5\), "
                                         r"which length_target_quantile 0.7 would not set"):
        _decide(model, tokenizer, [], tmp_path, quantile=0.7)
    with pytest.raises(ValueError, match="which length_target 3 would not set"):
        _decide(model, tokenizer, [], tmp_path, given=3)
    (tmp_path / "length_target.json").write_text("{")
    with pytest.raises(ValueError, match="unreadable length target"):
        _decide(model, tokenizer, [], tmp_path)


def test_run_rlvr_rewards_correct_rollouts_within_the_target(tmp_path, tiny_folder, task, monkeypatch):
    """A real training step: every rollout graded correct, so the reward is exactly "length <= target"."""
    model, tokenizer = load_policy(tiny_folder)
    monkeypatch.setattr(rewards, "grade", lambda completions, answers, verifier: [True] * len(completions))
    seen = []
    real_call = LengthAwareReward.__call__

    def spy(self, prompts, completions, completion_ids, answer, **kwargs):
        scores = real_call(self, prompts, completions, completion_ids, answer, **kwargs)
        seen.append((self.target, [list(ids) for ids in completion_ids], scores))
        return scores

    monkeypatch.setattr(LengthAwareReward, "__call__", spy)
    run_rlvr(model, tokenizer, task.examples("train", 4), VerifierConfig(compare="exact"),
             RLVRStageConfig(**SMALL), tmp_path, thinking=True, length_reward="truncation", length_target=15)
    (target, completion_ids, scores), = seen
    eos = end_token_ids(tokenizer, model)
    lengths = [len(ids) - (ids[-1] in eos) for ids in completion_ids]
    assert target == 15 and len(scores) == 8
    assert scores == [1.0 if n <= 15 else 0.0 for n in lengths]
    assert 0.0 in scores and 1.0 in scores  # the tiny model's lengths fall on both sides
    step = next(r for r in read_jsonl(tmp_path / "metrics.jsonl") if "rewards/correct_truncation/mean" in r)
    assert step["rewards/correct_truncation/mean"] == pytest.approx(sum(scores) / 8)
    assert step["rollouts/correct_over_target"] == pytest.approx(1 - sum(scores) / 8)
