"""OPSD stage: alignment, loss scaling, empty gates, tokenization and tiny training runs."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opsdlab.modeling.models import load_policy
from opsdlab.config.stages import OPSDStageConfig
from opsdlab.stages.opsd import (SCORINGS, check_alignment, final_hidden, loss_normalizer, response_positions,
                                 scoring_for, run_opsd)

from opsd_helpers import EXACT, ScriptedReward, make_trainer, record_teacher_prompts, snapshot


def test_response_positions_score_exactly_the_completion_tokens(tiny_folder):
    """Hidden states at response_positions reproduce the model's own logits for each completion token."""
    model, _ = load_policy(tiny_folder)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [0, 8, 9, 10, 11]])
    prompt_mask = (prompt != 0).long()
    completion = torch.tensor([[12, 13, 14], [15, 16, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids, attn = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        hidden = final_hidden(model, ids, attn)[:, response_positions(5, 3)]
        logits = model(input_ids=ids, attention_mask=attn).logits
    expected = logits[:, 4:7]
    assert torch.allclose(model.get_output_embeddings()(hidden), expected, atol=1e-5)


def _aligned_pair():
    response = torch.tensor([[7, 8, 9], [7, 8, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    student_prompt = torch.tensor([[0, 1, 2], [1, 2, 3]])
    teacher_prompt = torch.tensor([[0, 0, 1, 3, 4, 2], [1, 3, 4, 5, 2, 3]])
    student = (torch.cat([student_prompt, response], 1), torch.cat([(student_prompt != 0).long(), mask], 1))
    teacher = (torch.cat([teacher_prompt, response], 1), torch.cat([(teacher_prompt != 0).long(), mask], 1))
    return student, teacher, response, mask


def test_alignment_check_passes_on_aligned_sequences_and_catches_an_off_by_one_on_either_side():
    (s_ids, s_attn), (t_ids, t_attn), response, mask = _aligned_pair()
    s_pos, t_pos = response_positions(3, 3), response_positions(6, 3)
    check_alignment(s_ids, s_attn, s_pos, t_ids, t_attn, t_pos, response, mask)
    shifted = [slice(p.start + d, p.stop + d) for p in (s_pos, t_pos) for d in (-1, 1)]
    for bad_student in shifted[:2]:
        with pytest.raises(RuntimeError, match="student"):
            check_alignment(s_ids, s_attn, bad_student, t_ids, t_attn, t_pos, response, mask)
    for bad_teacher in shifted[2:]:
        with pytest.raises(RuntimeError, match="teacher"):
            check_alignment(s_ids, s_attn, s_pos, t_ids, t_attn, bad_teacher, response, mask)


def test_alignment_check_catches_a_response_glued_after_padding():
    """A teacher prompt padded on the right puts pad tokens between prompt and response."""
    (s_ids, s_attn), _, response, mask = _aligned_pair()
    teacher_prompt = torch.tensor([[1, 3, 2, 0], [1, 3, 2, 0]])  # right-padded: wrong side
    t_ids = torch.cat([teacher_prompt, response], 1)
    t_attn = torch.cat([(teacher_prompt != 0).long(), mask], 1)
    with pytest.raises(RuntimeError, match="teacher"):
        check_alignment(s_ids, s_attn, response_positions(3, 3), t_ids, t_attn, response_positions(4, 3),
                        response, mask)


def test_loss_normalizer_hand_computed():
    # 120 kept tokens over 2 processes: each process divides its sum by 60; DDP averages, so the
    # step's gradient is (sum_0 + sum_1) / 120.
    assert loss_normalizer(120, 2, 1, 1) == 60
    assert loss_normalizer(120, 1, 2, 2) == 120  # GA sums micro-batches: each divides by the step total
    assert loss_normalizer(120, 1, 1, 2) == 60  # a generation batch feeding two optimizer steps
    assert loss_normalizer(0, 2, 1, 1) == 0.5  # never a division by zero


def _step_gradients(tmp_path, tiny_folder, task, **overrides):
    """Gradients of the first optimizer step, read just before the optimizer applies them."""
    grads = {}

    class Grab:
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                              if p.grad is not None})

    from transformers import TrainerCallback

    callback = type("GrabGradients", (TrainerCallback,), {"on_pre_optimizer_step": Grab.on_pre_optimizer_step})()
    trainer = make_trainer(tmp_path, tiny_folder, task, callbacks=[callback], max_steps=1, **overrides)
    rollouts = _record_rollouts(trainer)
    trainer.train()
    return grads, rollouts, trainer.args


def _record_rollouts(trainer) -> list:
    """Every generation batch the trainer makes, as sorted (prompt ids, completion ids) rows."""
    batches = []
    generate = trainer._generate_and_score_completions

    def recording(inputs):
        batch = generate(inputs)
        rows = []
        for p, pm, c, cm in zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                batch["completion_mask"]):
            rows.append((tuple(p[pm.bool()].tolist()), tuple(c[cm.bool()].tolist())))
        batches.append({"rows": sorted(rows), "problems": [row["problem"] for row in inputs]})
        return batch

    trainer._generate_and_score_completions = recording
    return batches


def test_step_gradient_does_not_depend_on_gradient_accumulation(tmp_path, tiny_folder, task):
    """The same 8 rollouts (4 prompts per step) as one micro-batch (GA=1) or two (GA=2) give the same step gradient."""
    one, rollouts_one, args_one = _step_gradients(tmp_path / "ga1", tiny_folder, task, prompts_per_step=4,
                                                  gradient_accumulation_steps=1)
    two, rollouts_two, args_two = _step_gradients(tmp_path / "ga2", tiny_folder, task, prompts_per_step=4,
                                                  gradient_accumulation_steps=2)
    assert (args_one.per_device_train_batch_size, args_two.per_device_train_batch_size) == (8, 4)
    assert args_one.generation_batch_size == args_two.generation_batch_size == 8
    assert len(rollouts_one) == len(rollouts_two) == 1  # one generation batch feeds the step
    assert rollouts_one[0]["rows"] == rollouts_two[0]["rows"] and len(rollouts_one[0]["rows"]) == 8
    assert one.keys() == two.keys() and one
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-7), name


def test_one_rollout_per_prompt_trains_on_distinct_prompts(tmp_path, tiny_folder, task):
    """The paper's setting: 4 distinct prompts x 1 rollout per step (GA=2), 2 steps; the sibling
    context has no group to draw from and reads the reference solution."""
    from opsdlab.tasks.data import Example
    from opsdlab.tasks.prompts import render_prompt

    trainer = make_trainer(tmp_path, tiny_folder, task, rollouts_per_prompt=1, prompts_per_step=4,
                           gradient_accumulation_steps=2, teacher_context="sibling", gate="all")
    assert trainer.num_generations == trainer.args.num_generations == 1
    assert trainer.args.per_device_train_batch_size == 2 and trainer.args.generation_batch_size == 4
    batches = _record_rollouts(trainer)
    teacher_rows = record_teacher_prompts(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.skipped_steps == 0
    assert len(batches) == 2
    for batch in batches:
        assert len(batch["problems"]) == len(set(batch["problems"])) == 4  # every prompt of a step is distinct
        assert len(batch["rows"]) == 4
    assert max((before[n] - p).abs().max().item() for n, p in trainer.model.named_parameters()) > 0
    tokenizer = trainer.processing_class
    for row, ids in teacher_rows:
        example = Example(id=row["id"], problem=row["problem"], solution=row["solution"], answer=str(row["answer"]))
        expected = tokenizer(render_prompt(tokenizer, example, context="solution"))["input_ids"]
        assert ids == expected


def test_batch_sizes_count_one_optimizer_step_over_all_processes():
    """prompts_per_step and the SFT batch size are per optimizer step, over processes and accumulation steps."""
    from opsdlab.config.stages import RLVRStageConfig, SFTStageConfig

    assert OPSDStageConfig(prompts_per_step=32, rollouts_per_prompt=1).per_device_batch(8) == 4
    assert OPSDStageConfig(prompts_per_step=32, rollouts_per_prompt=4,
                           gradient_accumulation_steps=2).per_device_batch(8) == 8
    assert RLVRStageConfig(prompts_per_step=32, group_size=16).per_device_batch(8) == 64
    assert RLVRStageConfig(prompts_per_step=8, group_size=8).per_device_batch(1) == 64  # the tiny default
    assert SFTStageConfig(batch_size=32, gradient_accumulation_steps=2).per_device_batch(4) == 4
    assert SFTStageConfig().per_device_batch(1) == 32
    with pytest.raises(ValueError) as error:
        OPSDStageConfig(prompts_per_step=12, rollouts_per_prompt=2).per_device_batch(8)
    assert str(error.value) == ("opsd: prompts_per_step (12) must be a multiple of the number of processes (8): "
                                "each process generates whole groups of rollouts")
    with pytest.raises(ValueError) as error:
        RLVRStageConfig(prompts_per_step=8, group_size=3, gradient_accumulation_steps=16).per_device_batch(2)
    assert str(error.value) == ("rlvr: prompts_per_step (8) x rollouts per prompt (3) = 24 rows per optimizer step "
                                "do not split evenly over 2 process(es) x gradient_accumulation_steps 16 "
                                "(= 32 micro-batches); make it a multiple of 32")
    with pytest.raises(ValueError, match=r"sft: batch_size \(32\) = 32 rows .* 3 process\(es\)"):
        SFTStageConfig(batch_size=32).per_device_batch(3)
    with pytest.raises(ValueError, match="prompts_per_step >= 2"):
        OPSDStageConfig(prompts_per_step=1, rollouts_per_prompt=1)


def test_opsd_all_gate_trains_and_logs(tmp_path, tiny_folder, task):
    for divergence in ("reverse_kl", "sampled_reverse_kl"):
        config = OPSDStageConfig(gate="all", divergence=divergence, max_steps=2, prompts_per_step=2,
                                 rollouts_per_prompt=2, max_completion_length=12, learning_rate=1e-3,
                                 save_steps=100, logging_steps=1)
        model, tokenizer = load_policy(tiny_folder)
        before = snapshot(model)
        stage = tmp_path / divergence
        out = run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, stage, thinking=True)
        after, _ = load_policy(out)
        assert max((after.state_dict()[n] - p).abs().max().item() for n, p in before.items()) > 0
        records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        logged = {k for r in records for k in r}
        assert {"opsd/loss", "opsd/kept_fraction", "opsd/student_entropy", "opsd/teacher_entropy",
                "opsd/refill_rounds", "rollouts/accuracy", "rollouts/truncation_rate"} <= logged
        row = json.loads((stage / "token_stats.jsonl").read_text().splitlines()[0])
        assert len(row["token_ids"]) == len(row["loss"]) == len(row["logp_shift"])


def test_a_step_that_keeps_nothing_changes_no_weight_and_no_optimizer_state(tmp_path, tiny_folder, task):
    """Step 1 keeps every rollout, step 2 none (refill off): step 2 must leave weights and AdamW alone."""
    from transformers import TrainerCallback

    seen = {}

    class AfterEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            opt_state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                         for k, s in trainer.optimizer.state.items()}
            seen[state.global_step] = (snapshot(model), opt_state)

    reward = ScriptedReward(lambda call, n: [call == 1] * n)
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=reward, callbacks=[AfterEachStep()], gate="correct",
                           refill_max_rounds=1)
    trainer.train()
    (weights_1, adam_1), (weights_2, adam_2) = seen[1], seen[2]
    assert max((weights_1[n] - weights_2[n]).abs().max().item() for n in weights_1) == 0.0
    assert adam_1.keys() == adam_2.keys() and adam_1
    for key in adam_1:
        for field, value in adam_1[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(adam_2[key][field])), field
    assert trainer.skipped_steps == 1


def test_a_step_taken_one_parameter_group_at_a_time_updates_every_group(tmp_path, tiny_folder, task):
    """DeepSpeed's ZeRO-1/2 optimizer steps the Trainer's optimizer once per parameter group: every call
    of one optimizer step follows the step's single keep-or-skip decision, so no group is left out."""
    trainer = make_trainer(tmp_path, tiny_folder, task, gate="all", max_steps=2)
    optimizer = trainer.create_optimizer()
    guarded_step, groups = optimizer.step, optimizer.param_groups
    assert len(groups) == 2 and all(group["params"] for group in groups)  # decayed and not decayed

    def one_group_at_a_time(*args, **kwargs):
        for group in groups:  # as ZeRO's _optimizer_step(group_no)
            optimizer.param_groups = [group]
            guarded_step()
        optimizer.param_groups = groups

    optimizer.step = one_group_at_a_time
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.skipped_steps == 0 and not trainer.last_step_skipped
    for group in groups:
        assert all(id(p) in {id(q) for q in optimizer.state} for p in group["params"])
    assert min((before[n] - p).abs().max().item() for n, p in trainer.model.named_parameters()) > 0


def test_an_empty_round_is_refilled_with_fresh_prompts(tmp_path, tiny_folder, task):
    """Round 1 keeps nothing; the refill round keeps every rollout; the batch keeps its size."""
    reward = ScriptedReward(lambda call, n: [call % 2 == 0] * n)  # calls 1, 3, ... all wrong
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=reward, gate="correct", max_steps=1)
    before = snapshot(trainer.model)
    trainer.train()
    assert reward.calls == 2
    assert trainer.skipped_steps == 0
    assert max((before[n] - p).abs().max().item() for n, p in trainer.model.named_parameters()) > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("opsd/refill_rounds") == 1 and r.get("opsd/kept_fraction") == 1.0 for r in records)


def test_nothing_kept_after_every_refill_round_skips_the_step(tmp_path, tiny_folder, task):
    """A random model solves nothing: the correct-only gate drops every rollout of every round."""
    trainer = make_trainer(tmp_path, tiny_folder, task, gate="correct", refill_max_rounds=3)
    before = snapshot(trainer.model)
    trainer.train()
    assert max((before[n] - p).abs().max().item() for n, p in trainer.model.named_parameters()) == 0.0
    assert trainer.skipped_steps == 2
    assert not trainer.optimizer.state  # AdamW never stepped
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("opsd/refill_rounds", 0) for r in records) == 2


def test_teacher_prompts_are_tokenized_like_student_prompts_with_a_bos_tokenizer(tmp_path, bos_folder, task):
    """A tokenizer that adds BOS: both prompts start with exactly one BOS, and the check passes."""
    trainer = make_trainer(tmp_path, bos_folder, task, max_steps=1)
    tokenizer = trainer.processing_class
    rows = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(2)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    bos = tokenizer.bos_token_id
    for ids_key, mask_key in (("prompt_ids", "prompt_mask"), ("teacher_prompt_ids", "teacher_prompt_mask")):
        for ids, mask in zip(batch[ids_key], batch[mask_key]):
            real = ids[mask.bool()].tolist()
            assert real[0] == bos and real.count(bos) == 1, ids_key
    trainer.train()  # the alignment check runs on every micro-batch


def test_lora_run_saves_a_merged_plain_folder(tmp_path, tiny_folder, task):
    config = OPSDStageConfig(gate="all", lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=2, prompts_per_step=2,
                             rollouts_per_prompt=2, max_completion_length=12, save_steps=100)
    model, tokenizer = load_policy(tiny_folder)
    before = snapshot(model)
    out = run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, tmp_path / "opsd", thinking=True)
    after, _ = load_policy(out)
    assert max((after.state_dict()[n] - p).abs().max().item() for n, p in before.items()) > 0
    assert not (out / "adapter_config.json").exists()


def test_config_rejects_bad_refill_settings():
    with pytest.raises(ValueError, match="refill_max_rounds"):
        OPSDStageConfig(refill_max_rounds=0)


def test_the_loss_applies_the_models_final_logit_softcapping(tmp_path, task, monkeypatch):
    """Gemma 2 caps its logits after the LM head; the OPSD loss applies the head itself, so must cap too."""
    import opsdlab.stages.opsd as opsd_module
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, save_policy

    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    folder = tmp_path / "gemma2"
    save_policy(build_tiny_model(tokenizer, architecture="gemma2"), tokenizer, folder)
    heads = []
    real = opsd_module.chunked_divergence

    def spy(student_hidden, teacher_hidden, student_head, teacher_head, *args, **kwargs):
        heads.append((student_head, teacher_head))
        return real(student_hidden, teacher_hidden, student_head, teacher_head, *args, **kwargs)

    monkeypatch.setattr(opsd_module, "chunked_divergence", spy)
    trainer = make_trainer(tmp_path / "stage", folder, task, max_steps=1)
    trainer.train()
    student_lm_head = trainer.model.get_output_embeddings()
    teacher_lm_head = load_policy(folder)[0].get_output_embeddings()  # the frozen teacher: starting weights
    hidden = torch.randn(5, trainer.model.config.hidden_size) * 50
    student_head, teacher_head = heads[-1]
    with torch.no_grad():
        assert torch.allclose(student_head(hidden), torch.tanh(student_lm_head(hidden) / 30.0) * 30.0, atol=1e-4)
        assert torch.allclose(teacher_head(hidden), torch.tanh(teacher_lm_head(hidden) / 30.0) * 30.0, atol=1e-4)


def _scored_loss(scoring: str, student, teacher, student_ids, teacher_ids, completion, mask):
    """The OPSD loss of one batch under one `SCORINGS` entry (all positions attended)."""
    from opsdlab.loss.chunked import chunked_divergence

    way, width = SCORINGS[scoring], completion.shape[1]
    student_scores = way.scores(student, student_ids, torch.ones_like(student_ids),
                                response_positions(student_ids.shape[1] - width, width))
    with torch.no_grad():
        teacher_scores = way.scores(teacher, teacher_ids, torch.ones_like(teacher_ids),
                                    response_positions(teacher_ids.shape[1] - width, width))
    loss, _ = chunked_divergence(student_scores[mask], teacher_scores[mask], way.head(student), way.head(teacher),
                                 completion[mask], "reverse_kl", chunk_size=3)
    return loss


@pytest.mark.parametrize("architecture", ["qwen3", "gemma2"])
def test_hidden_and_logits_scoring_give_the_same_loss_and_gradients(task, architecture):
    """The LM head applied chunk by chunk to hidden states and the logits of the model's own forward
    (the scoring of sharded launches) are the same loss and gradient; Gemma 2 caps its logits in both."""
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    completion = torch.randint(5, len(tokenizer), (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    student_ids = torch.cat([torch.randint(5, len(tokenizer), (2, 3)), completion], 1)
    teacher_ids = torch.cat([torch.randint(5, len(tokenizer), (2, 7)), completion], 1)
    teacher = build_tiny_model(tokenizer, seed=1, architecture=architecture)
    results = {}
    for scoring in SCORINGS:
        student = build_tiny_model(tokenizer, seed=0, architecture=architecture)
        loss = _scored_loss(scoring, student, teacher, student_ids, teacher_ids, completion, mask)
        loss.backward()
        results[scoring] = loss.item(), {n: p.grad.clone() for n, p in student.named_parameters()}
    (hidden_loss, hidden_grads), (logits_loss, logits_grads) = results["hidden"], results["logits"]
    assert hidden_loss > 0 and abs(hidden_loss - logits_loss) < 1e-5
    assert max((hidden_grads[n] - logits_grads[n]).abs().max().item() for n in hidden_grads) < 1e-5


def test_both_scorings_run_a_bf16_student_under_accelerate_mixed_precision(task):
    """With `bf16=True` accelerate wraps the student's forward in autocast and returns its outputs in
    float32, so the hidden states reach the bf16 LM head as float32: each scoring must still give the
    loss (the same one, to bf16 precision) and a gradient."""
    from accelerate.utils import convert_outputs_to_fp32

    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    completion = torch.randint(5, len(tokenizer), (2, 5))
    mask = torch.ones_like(completion, dtype=torch.bool)
    student_ids = torch.cat([torch.randint(5, len(tokenizer), (2, 3)), completion], 1)
    teacher_ids = torch.cat([torch.randint(5, len(tokenizer), (2, 7)), completion], 1)
    teacher = build_tiny_model(tokenizer, seed=1).to(torch.bfloat16)
    losses = {}
    for scoring in SCORINGS:
        student = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16)
        forward = student.forward  # as Accelerator.prepare_model wraps it for mixed_precision="bf16"
        student.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(forward))
        loss = _scored_loss(scoring, student, teacher, student_ids, teacher_ids, completion, mask)
        loss.backward()
        assert student.get_output_embeddings().weight.grad.abs().sum() > 0
        losses[scoring] = loss.item()
    assert losses["hidden"] > 0 and abs(losses["hidden"] - losses["logits"]) < 0.02 * losses["logits"]


def test_sharded_launches_take_the_logits_from_the_forward():
    """FSDP and ZeRO-3 keep the LM head sharded outside the forward; DDP, ZeRO-2 and one process do not."""
    from accelerate.utils import DistributedType

    def launch(fsdp=None, zero_stage=None):
        kind = (DistributedType.FSDP if fsdp is not None else DistributedType.DEEPSPEED if zero_stage is not None
                else DistributedType.MULTI_GPU)
        deepspeed = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        return SimpleNamespace(distributed_type=kind,
                               state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed))

    assert scoring_for(launch(fsdp=object())) == "logits"
    assert scoring_for(launch(zero_stage=3)) == "logits"
    assert scoring_for(launch(zero_stage=2)) == "hidden"
    assert scoring_for(launch()) == "hidden"


def test_fsdp2_sharded_student_and_teacher_get_the_unsharded_loss_and_gradients(tmp_path):
    """Two gloo processes shard student and teacher with FSDP2 as accelerate and TRL do: the LM head on
    hidden states fails there (the failure seen on a GPU), the forward's logits give the unsharded loss
    and gradient."""
    from launch_helpers import free_port, run_with_deadline

    script = Path(__file__).parent / "scripts" / "fsdp_scoring.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(script), str(tmp_path)]
    returncode, output = run_with_deadline(command, env, tmp_path / "launch.log", 150)
    assert returncode == 0, output[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["parameters"] > 0
        assert abs(result["sharded_logits_loss"] - result["reference_loss"]) < 1e-5
        assert abs(result["reference_logits_loss"] - result["reference_loss"]) < 1e-5
        assert result["gradient_difference"] < 1e-5
        assert "DTensor" in (result["hidden_error"] or "")


def test_the_trainer_trains_the_same_weights_with_either_scoring(tmp_path, tiny_folder, task, monkeypatch):
    """Two OPSD steps through the real trainer, once as on one process and once with the scoring a
    sharded launch picks: same rollouts, same weights."""
    import opsdlab.stages.opsd as opsd_module

    widths, real = [], opsd_module.chunked_divergence

    def spy(student_scores, *args, **kwargs):
        widths.append(student_scores.shape[-1])
        return real(student_scores, *args, **kwargs)

    monkeypatch.setattr(opsd_module, "chunked_divergence", spy)
    weights = {}
    for scoring in SCORINGS:
        monkeypatch.setattr(opsd_module, "scoring_for", lambda accelerator, chosen=scoring: chosen)
        trainer = make_trainer(tmp_path / scoring, tiny_folder, task, max_steps=2, gate="all")
        # Adam divides by sqrt(v) + eps: where a gradient entry is near eps (1e-8) its update moves by
        # lr/eps times any float32 rounding difference between two correct computations. An eps of 1e-3
        # keeps that factor at 10, so the weights are compared at a tolerance that can still fail.
        trainer.args.adam_epsilon = 1e-3
        start = snapshot(trainer.model)
        widths.clear()
        trainer.train()
        config = trainer.model.config
        assert set(widths) == {config.hidden_size if scoring == "hidden" else config.vocab_size}
        weights[scoring] = snapshot(trainer.model)
    assert max((weights["hidden"][n] - start[n]).abs().max().item() for n in start) > 0
    for name in start:
        assert torch.allclose(weights["hidden"][name], weights["logits"][name], rtol=1e-4, atol=1e-6), name


def test_a_task_instruction_reaches_the_teacher_through_the_trainer(tmp_path):
    """With `instruction: ""` the real trainer's teacher prompts (two optimizer steps) are the student
    prompts of the same rows plus the reference block: no generic instruction creeps back in when the
    teacher's example is rebuilt from a dataset row."""
    from opsdlab.tasks.data import Example
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, save_policy
    from opsdlab.tasks.prompts import DEFAULT_INSTRUCTION, TEACHER_CONTEXTS
    from opsdlab.tasks import build_task

    task = build_task("synthetic", {"instruction": ""})
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    folder = tmp_path / "model"
    save_policy(build_tiny_model(tokenizer, seed=0), tokenizer, folder)
    trainer = make_trainer(tmp_path / "opsd", folder, task, teacher_context="solution")
    teacher_rows = record_teacher_prompts(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and teacher_rows
    for row, ids in teacher_rows:
        teacher = tokenizer.decode(ids)
        assert DEFAULT_INSTRUCTION not in teacher and DEFAULT_INSTRUCTION not in row["prompt"]
        block = TEACHER_CONTEXTS["solution"](Example(row["id"], row["problem"], row["solution"], row["answer"]), None)
        cut = row["prompt"].index("<|im_end|>")
        assert ids == tokenizer(row["prompt"][:cut] + "\n\n" + block + row["prompt"][cut:])["input_ids"]


def test_a_skipped_step_does_not_advance_the_learning_rate_schedule(tmp_path, tiny_folder, task):
    """Steps 1 and 3 keep every rollout, step 2 none (refill off): a linear decay over 3 steps moves
    on after steps 1 and 3 only, and step 3 trains at the rate step 2 would have used."""
    from transformers import TrainerCallback

    positions, rates = [], []

    class AfterEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            positions.append(trainer.lr_scheduler.last_epoch)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rates.append(trainer.optimizer.param_groups[0]["lr"])

    reward = ScriptedReward(lambda call, n: [call != 2] * n)
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=reward, callbacks=[AfterEachStep()], gate="correct",
                           refill_max_rounds=1, max_steps=3, lr_scheduler_type="linear", learning_rate=3e-3)
    trainer.train()
    assert trainer.skipped_steps == 1
    assert positions == [1, 1, 2]
    assert rates == pytest.approx([3e-3, 2e-3, 2e-3])


def test_config_rejects_a_temperature_that_is_not_positive():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="opsd: temperature must be (> 0|a finite number)"):
            OPSDStageConfig(temperature=bad)
