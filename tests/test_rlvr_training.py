"""RLVR through TRL's GRPOTrainer on the tiny model: parameters move; dynamic sampling drops and refills."""

import pytest
import torch

from opsdlab.modeling.models import load_policy
from opsdlab.config.stages import RLVRStageConfig
from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, informative_groups, rl_dataset, run_rlvr
from opsdlab.tasks.verifier import VerifierConfig

SMALL = dict(max_steps=2, prompts_per_step=4, group_size=2, max_completion_length=8, learning_rate=1e-3,
             save_steps=100, logging_steps=1)


def even_groups_constant(prompts, completions, completion_ids, id, **_):
    """Reward with no variance for problems with an even index and a random 0/1 for the others."""
    return [0.0 if int(i.split("-")[1]) % 2 == 0 else float(torch.rand(()).item() < 0.5) for i in id]


def coin_reward(completions, **_):
    """A reward with variance for a random model, which the verifier scores 0 everywhere."""
    return [float(torch.rand(()).item() < 0.5) for _ in completions]


def test_rlvr_moves_parameters_and_logs_rollout_stats(tmp_path, tiny_folder, task):
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.modeling.runtime import JsonlMetrics

    model, tokenizer = load_policy(tiny_folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = RLVRStageConfig(**SMALL)
    verifier_reward = VerifierReward(VerifierConfig(compare="exact"), {tokenizer.eos_token_id})
    trainer = RLVRTrainer(model=model, reward_funcs=[verifier_reward, coin_reward],
                          args=grpo_args(config, tmp_path, 0),
                          train_dataset=rl_dataset(task.examples("train", 8), tokenizer, True),
                          processing_class=tokenizer, callbacks=[JsonlMetrics(tmp_path / "metrics.jsonl")])
    trainer.train()
    assert max((trainer.model.state_dict()[n] - p).abs().max().item() for n, p in before.items()) > 0
    logged = (tmp_path / "metrics.jsonl").read_text()
    for key in ("rollouts/accuracy", "rollouts/truncation_rate", "rollouts/mean_length", "frac_reward_zero_std"):
        assert key in logged


def test_run_rlvr_writes_a_model_folder(tmp_path, tiny_folder, task):
    model, tokenizer = load_policy(tiny_folder)
    config = RLVRStageConfig(**{**SMALL, "max_steps": 1})
    out = run_rlvr(model, tokenizer, task.examples("train", 4), VerifierConfig(compare="exact"), config,
                   tmp_path / "rlvr", thinking=True)
    assert (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


@pytest.mark.parametrize("rounds", [4])
def test_dynamic_sampling_drops_uninformative_groups_and_refills(tmp_path, tiny_folder, task, rounds):
    torch.manual_seed(1)
    model, tokenizer = load_policy(tiny_folder)
    config = RLVRStageConfig(**SMALL)
    examples = task.examples("train", 40)
    trainer = RLVRTrainer(model=model, reward_funcs=[even_groups_constant], args=grpo_args(config, tmp_path, 0),
                          train_dataset=rl_dataset(examples, tokenizer, True),
                          processing_class=tokenizer, dynamic_sampling=True, dynamic_sampling_max_rounds=rounds)
    trainer.model.train()
    rows = [dict(trainer.train_dataset[i]) for i in range(4) for _ in range(2)]  # 2 even-id (dead) groups
    batch = trainer._generate_and_score_completions(rows)
    assert batch["completion_ids"].shape[0] == 8  # the batch keeps its size
    assert batch["prompt_ids"].shape[0] == batch["advantages"].shape[0] == 8
    dropped = trainer._metrics["train"]["dynamic_sampling/dropped_groups"][-1]
    assert dropped >= 2  # at least the two constant-reward groups of the first round
    informative = informative_groups(batch["advantages"], 2)
    kept = trainer._metrics["train"]["dynamic_sampling/kept_fraction"][-1]
    assert kept == informative.float().mean().item()
    assert kept >= 0.5  # refilled groups replaced the dropped ones
    assert int(batch["num_items_in_batch"]) == int(batch["completion_mask"].sum())


def test_paged_generation_trains_a_step(tmp_path, tiny_folder, task):
    """transformers' continuous batching as the rollout generator (generation_backend=paged), on CPU."""
    model, tokenizer = load_policy(tiny_folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = RLVRStageConfig(**{**SMALL, "max_steps": 1, "generation_backend": "paged"})
    trainer = RLVRTrainer(model=model, reward_funcs=[coin_reward], args=grpo_args(config, tmp_path, 0),
                          train_dataset=rl_dataset(task.examples("train", 8), tokenizer, True),
                          processing_class=tokenizer)
    assert trainer.use_transformers_continuous_batching
    trainer.train()
    assert max((trainer.model.state_dict()[n] - p).abs().max().item() for n, p in before.items()) > 0
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    assert lengths and 0 < lengths[0] <= 8
