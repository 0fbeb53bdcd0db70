import pytest
import torch

from opsdlab.loss.rewards import VerifierReward, rollout_stats
from opsdlab.stages.rlvr import concat_batches, informative_groups, select_rows
from opsdlab.tasks.verifier import VerifierConfig


def test_reward_and_evaluation_agree_on_the_same_responses():
    from opsdlab.tasks.verifier import is_correct

    verifier = VerifierConfig(extract="last_boxed", compare="exact")
    responses = ["<think>\n1 + 2 = 3\n</think>\n\nThe answer is \\boxed{3}.", "The answer is \\boxed{4}.",
                 "no answer", "\\boxed{2} then \\boxed{3}"]
    reward = VerifierReward(verifier, eos_token_ids={0})
    logged = {}
    scores = reward(prompts=[""] * 4, completions=responses, completion_ids=[[5, 0], [5, 0], [5, 5], [5]],
                    answer=["3"] * 4, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert scores == [1.0 if is_correct(r, "3", verifier) else 0.0 for r in responses] == [1.0, 0.0, 0.0, 1.0]
    assert reward.last_truncated == [False, False, True, True]
    assert logged["rollouts/accuracy"] == 0.5
    assert logged["rollouts/truncation_rate"] == 0.5


def test_rollout_stats_split_lengths():
    stats = rollout_stats([True, False, True], [False, False, True], [10, 20, 30])
    assert stats["rollouts/mean_length_correct"] == 20
    assert stats["rollouts/mean_length_incorrect"] == 20
    assert "rollouts/mean_length_incorrect" not in rollout_stats([True], [False], [5])


def test_informative_groups_detects_all_equal_rewards():
    advantages = torch.tensor([0.0, 0.0, 0.5, -0.5, 0.0, 0.0])
    assert informative_groups(advantages, 2).tolist() == [False, True, False]


def _batch(rows, prompt_width, completion_width, offset):
    return {
        "prompt_ids": torch.full((rows, prompt_width), offset + 1),
        "prompt_mask": torch.ones(rows, prompt_width, dtype=torch.long),
        "completion_ids": torch.full((rows, completion_width), offset + 2),
        "completion_mask": torch.ones(rows, completion_width, dtype=torch.long),
        "advantages": torch.arange(rows, dtype=torch.float) + offset,
        "num_items_in_batch": torch.tensor(rows * completion_width),
    }


def test_select_and_concat_pad_prompts_left_and_completions_right():
    a = select_rows(_batch(4, 3, 2, 0), torch.tensor([2, 3]))
    b = _batch(2, 5, 4, 10)
    merged = concat_batches([a, b], pad_token_id=0)
    assert merged["prompt_ids"].shape == (4, 5)
    assert merged["prompt_ids"][0].tolist() == [0, 0, 1, 1, 1]
    assert merged["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert merged["completion_ids"][0].tolist() == [2, 2, 0, 0]
    assert merged["completion_mask"][1].tolist() == [1, 1, 0, 0]
    assert merged["advantages"].tolist() == [2.0, 3.0, 10.0, 11.0]


def test_generation_backend_reaches_grpo_config(tmp_path):
    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig
    from opsdlab.stages.opsd import opsd_args
    from opsdlab.stages.rlvr import grpo_args

    small = dict(prompts_per_step=4, group_size=2, max_completion_length=8)
    plain = grpo_args(RLVRStageConfig(**small), tmp_path, 0, num_processes=1)
    assert not plain.use_vllm and not plain.use_transformers_continuous_batching
    paged = grpo_args(RLVRStageConfig(**small, generation_backend="paged"), tmp_path, 0, num_processes=1)
    assert paged.use_transformers_continuous_batching and not paged.use_vllm
    # CPU: 8 rollouts per process, each up to 512 prompt + 8 response tokens = ceil(520 / 32) = 17 pages
    assert paged.transformers_continuous_batching_config == {"page_size": 32, "num_blocks": 136,
                                                              "max_batch_tokens": 256}
    opsd = opsd_args(OPSDStageConfig(prompts_per_step=4, rollouts_per_prompt=1, generation_backend="paged"),
                     tmp_path, 0, num_processes=1)
    assert opsd.use_transformers_continuous_batching
    for settings in ({"generation_backend": "vllm"}, {"use_vllm": True},
                     {"use_vllm": True, "generation_backend": "vllm"}):
        args = grpo_args(RLVRStageConfig(**small, **settings), tmp_path, 0, num_processes=1)
        assert args.use_vllm and not args.use_transformers_continuous_batching


def test_generation_backend_is_checked():
    from opsdlab.config.stages import RLVRStageConfig

    with pytest.raises(ValueError, match=r"rlvr: generation_backend must be one of "
                                         r"\('transformers', 'paged', 'vllm'\), got 'sglang'"):
        RLVRStageConfig(generation_backend="sglang")
    with pytest.raises(ValueError, match="rlvr: use_vllm asks for vLLM but generation_backend is 'paged'"):
        RLVRStageConfig(use_vllm=True, generation_backend="paged")
