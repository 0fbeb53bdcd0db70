"""Teacher weights are what they are named, checked through the real OPSDTrainer after optimizer steps.

Every test trains the student for at least two optimizer steps at a learning rate that moves the
weights, then compares the teacher's logits on fixed inputs with an independent reference.
"""

import pytest
import torch
from transformers import TrainerCallback

from opsdlab.modeling.models import load_model, load_policy
from opsdlab.stages.teacher import EMA_STATE_FILE

from opsd_helpers import make_trainer, snapshot

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


class RecordStudent(TrainerCallback):
    """The student's parameters after every optimizer step."""

    def __init__(self):
        self.trajectory = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trajectory.append(snapshot(model))


def teacher_logits(trainer, ids=IDS):
    student = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad(), trainer.teacher.use(student) as teacher:
        return teacher(input_ids=ids).logits


def logits_of(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_frozen_teacher_is_the_starting_model_loaded_fresh_from_disk(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="frozen", max_steps=3)
    trainer.train()
    start = load_model(tiny_folder)
    student = logits_of(trainer.model)
    assert not torch.allclose(student, logits_of(start), atol=1e-3)  # the student moved
    assert torch.allclose(teacher_logits(trainer), logits_of(start), atol=1e-6)


def test_frozen_teacher_does_not_share_the_students_backbone(tmp_path, tiny_folder, task):
    """Perturbing only the student leaves the frozen teacher's hidden states unchanged."""
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="frozen", max_steps=1)
    before = teacher_logits(trainer)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.5)
    assert torch.equal(teacher_logits(trainer), before)


def test_ema_teacher_is_the_average_of_the_student_trajectory(tmp_path, tiny_folder, task):
    rate = 0.3
    recorder = RecordStudent()
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="ema", ema_rate=rate, max_steps=3,
                           callbacks=[recorder])
    trainer.train()
    expected = load_model(tiny_folder)
    ema = snapshot(expected)
    for weights in recorder.trajectory:
        ema = {n: (1 - rate) * ema[n] + rate * weights[n] for n in ema}
    expected.load_state_dict(ema, strict=False)
    assert len(recorder.trajectory) == 3
    assert not torch.allclose(logits_of(expected), logits_of(load_model(tiny_folder)), atol=1e-3)
    assert torch.allclose(teacher_logits(trainer), logits_of(expected), atol=1e-5)


def test_live_teacher_is_the_current_student(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="live", max_steps=2)
    trainer.train()
    assert torch.equal(teacher_logits(trainer), logits_of(trainer.model))
    assert not torch.allclose(teacher_logits(trainer), logits_of(load_model(tiny_folder)), atol=1e-3)


def test_frozen_teacher_of_a_fresh_lora_student_is_the_base(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="frozen", lora_r=4, lora_alpha=8,
                           learning_rate=5e-2, max_steps=2)
    trainer.train()
    assert trainer.teacher.copy is None  # no second copy of the weights
    base = logits_of(load_model(tiny_folder))
    assert not torch.allclose(logits_of(trainer.model), base, atol=1e-4)
    assert torch.allclose(teacher_logits(trainer), base, atol=1e-5)


def test_frozen_teacher_of_a_pretrained_adapter_keeps_that_adapter(tmp_path, tiny_folder, task):
    """A student that arrives with a trained adapter: the teacher is base + that adapter, not the base."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_policy(tiny_folder)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                              init_lora_weights=False))
    at_start = logits_of(student)
    assert not torch.allclose(at_start, logits_of(load_model(tiny_folder)), atol=1e-4)
    trainer = make_trainer(tmp_path, tiny_folder, task, model=student, teacher_weights="frozen",
                           learning_rate=5e-2, max_steps=2)
    trainer.train()
    assert not torch.allclose(logits_of(trainer.model), at_start, atol=1e-4)
    assert torch.allclose(teacher_logits(trainer), at_start, atol=1e-5)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("opsd_frozen" not in n for n in trainable)


def test_ema_teacher_of_a_lora_student_averages_the_adapter(tmp_path, tiny_folder, task):
    rate = 0.5
    recorder = RecordStudent()
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="ema", ema_rate=rate, lora_r=4,
                           lora_alpha=8, learning_rate=5e-2, max_steps=2, callbacks=[recorder])
    ema = {n: p for n, p in snapshot(trainer.model).items() if ".default." in n}
    trainer.train()
    for weights in recorder.trajectory:
        ema = {n: (1 - rate) * ema[n] + rate * weights[n] for n in ema}
    own = dict(trainer.model.named_parameters())
    moved = 0.0
    for name, expected in ema.items():
        moved = max(moved, (own[name] - expected).abs().max().item())
        assert torch.allclose(own[name.replace(".default.", ".opsd_ema.")], expected, atol=1e-6), name
    assert moved > 0  # the student's adapter is not its average


def _ema_run(stage_dir, tiny_folder, task, *, max_steps, stop_at=None):
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    trainer = make_trainer(stage_dir, tiny_folder, task, teacher_weights="ema", ema_rate=0.3, max_steps=max_steps,
                           save_steps=2, learning_rate=1e-2, callbacks=[Stop()])
    return trainer


def test_ema_state_is_checkpointed_and_restored_on_resume(tmp_path, tiny_folder, task):
    straight = _ema_run(tmp_path / "straight", tiny_folder, task, max_steps=4)
    straight.train()

    killed = _ema_run(tmp_path / "resumed", tiny_folder, task, max_steps=4, stop_at=2)
    killed.train()
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / EMA_STATE_FILE).exists()
    resumed = _ema_run(tmp_path / "resumed", tiny_folder, task, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert torch.allclose(logits_of(resumed.model), logits_of(straight.model), atol=1e-5)
    assert torch.allclose(teacher_logits(resumed), teacher_logits(straight), atol=1e-5)


def test_resuming_an_ema_arm_without_its_teacher_state_is_an_error(tmp_path, tiny_folder, task):
    killed = _ema_run(tmp_path, tiny_folder, task, max_steps=4, stop_at=2)
    killed.train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    (checkpoint / EMA_STATE_FILE).unlink()
    resumed = _ema_run(tmp_path, tiny_folder, task, max_steps=4)
    with pytest.raises(FileNotFoundError, match=EMA_STATE_FILE):
        resumed.train(resume_from_checkpoint=str(checkpoint))


# ------------------------------------------------------------------ building and updating, unit level
def _nudge(model, generator, scale=1e-2):
    """Move every weight of `model` a little (a stand-in for an optimizer step)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)


def _own(module, marker=None):
    return {n: p.detach().clone() for n, p in module.named_parameters() if marker is None or marker in n}


def test_bf16_ema_teacher_is_the_float32_average_cast_to_bf16(tiny_folder):
    from accelerate import Accelerator

    from opsdlab.stages.teacher import build_teacher

    rate, generator = 0.05, torch.Generator().manual_seed(1)
    student = load_model(tiny_folder, "bfloat16")
    teacher = build_teacher("ema", student, Accelerator(), rate=rate)
    expected = {n: p.float() for n, p in _own(student).items()}
    for _ in range(4):
        _nudge(student, generator)
        teacher.after_step(student)
        expected = {n: e.lerp(student.get_parameter(n).detach().float(), rate) for n, e in expected.items()}
    got = _own(teacher.copy)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name


def test_bf16_ema_teacher_stays_put_while_the_student_equals_it(tiny_folder):
    from accelerate import Accelerator

    from opsdlab.stages.teacher import build_teacher

    student = load_model(tiny_folder, "bfloat16")
    teacher = build_teacher("ema", student, Accelerator(), rate=0.05)
    before = _own(teacher.copy)
    for _ in range(5):
        teacher.after_step(student)
    changed = sum((v != before[n]).sum().item() for n, v in _own(teacher.copy).items())
    assert changed == 0


def test_bf16_ema_adapter_is_the_float32_average_and_stays_put_on_a_still_student(tiny_folder):
    """PEFT adds the EMA adapter in float32 (autocast_adapter_dtype) even beside a bf16 one."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from opsdlab.stages.teacher import EMA_ADAPTER, build_teacher

    rate, generator = 0.05, torch.Generator().manual_seed(2)
    student = get_peft_model(load_model(tiny_folder, "bfloat16"),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                             autocast_adapter_dtype=False)
    teacher = build_teacher("ema", student, Accelerator(), rate=rate, pretrained_adapter=True)
    start = _own(student, f".{EMA_ADAPTER}.")
    assert start and all(v.dtype == torch.bfloat16 for v in _own(student, ".default.").values())
    for _ in range(5):
        teacher.after_step(student)
    assert all(torch.equal(v, start[n]) for n, v in _own(student, f".{EMA_ADAPTER}.").items())

    trainable = [p for n, p in student.named_parameters() if ".default." in n]
    expected = {n: v.float() for n, v in start.items()}
    for _ in range(4):
        with torch.no_grad():
            for p in trainable:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 1e-2)
        teacher.after_step(student)
        own = dict(student.named_parameters())
        expected = {n: e.lerp(own[n.replace(f".{EMA_ADAPTER}.", ".default.")].detach().float(), rate)
                    for n, e in expected.items()}
    for name, value in _own(student, f".{EMA_ADAPTER}.").items():
        assert torch.equal(value, expected[name].to(value.dtype)), name


@pytest.mark.parametrize("kind", ["frozen", "ema", "periodic"])
def test_building_a_teacher_leaves_the_students_config_alone(tiny_folder, kind):
    """The copy's model class writes its dtype and attention implementation into the config it is given."""
    from accelerate import Accelerator

    from opsdlab.stages.teacher import build_teacher

    student = load_model(tiny_folder)
    student.config.dtype = torch.bfloat16  # as saved by a bf16 run, loaded here in float32
    before = student.config.to_dict()
    teacher = build_teacher(kind, student, Accelerator())
    assert student.config.to_dict() == before
    assert teacher.copy.config is not student.config


@pytest.mark.parametrize("kind", ["frozen", "ema", "periodic"])
def test_building_a_teacher_leaves_the_global_rng_alone(tiny_folder, kind):
    from accelerate import Accelerator

    from opsdlab.stages.teacher import build_teacher

    student = load_model(tiny_folder)
    state = torch.get_rng_state()
    build_teacher(kind, student, Accelerator())
    assert torch.equal(torch.get_rng_state(), state)


def test_frozen_and_live_arms_with_one_seed_draw_the_same_first_rollouts(tmp_path, tiny_folder, task):
    rollouts = {}
    for kind in ("frozen", "live"):
        trainer = make_trainer(tmp_path / kind, tiny_folder, task, teacher_weights=kind, max_steps=1)
        drawn = rollouts[kind] = []
        gated_round = trainer._gated_round

        def recording(inputs, gated_round=gated_round, drawn=drawn):
            batch = gated_round(inputs)
            drawn.append(batch["completion_ids"].tolist())
            return batch

        trainer._gated_round = recording
        trainer.train()
    assert rollouts["frozen"] and rollouts["frozen"] == rollouts["live"]


# ------------------------------------------------------------------ LoRA: resume and selection with a teacher adapter
def _adapter(model, name="default") -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


@pytest.mark.parametrize("kind", ["ema", "periodic"])
def test_a_resumed_lora_arm_with_a_teacher_adapter_equals_an_uninterrupted_one(tmp_path, tiny_folder, task, kind):
    """The checkpoint holds the student's adapter alone: the Trainer's loader, which loads only the
    subfolders when a checkpoint has any, restores the student (the teacher comes from its own file)."""
    def run(stage_dir, stop_at=None):
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop_at is not None and state.global_step >= stop_at:
                    control.should_training_stop = True

        return make_trainer(stage_dir, tiny_folder, task, teacher_weights=kind, ema_rate=0.3, teacher_refresh_steps=3,
                            lora_r=4, lora_alpha=8, learning_rate=5e-2, max_steps=4, save_steps=2,
                            callbacks=[Stop()])

    straight = run(tmp_path / "straight")
    straight.train()
    run(tmp_path / "resumed", stop_at=2).train()
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    student, teacher = "default", {"ema": "opsd_ema", "periodic": "opsd_periodic"}[kind]
    for name in (student, teacher):
        expected, got = _adapter(straight.model, name), _adapter(resumed.model, name)
        assert got and got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in got), f"the {name} adapter differs after resuming"


def test_a_lora_ema_arm_saves_the_selected_checkpoints_student_as_model(tmp_path, tiny_folder, task, monkeypatch):
    """With checks, model/ is the student of the checkpoint selection.json names, merged into the base."""
    import json

    from peft import PeftModel

    from opsdlab.stages.checks import HeldOutCheck
    from opsdlab.stages.opsd import OPSDStageConfig, run_opsd

    from opsd_helpers import EXACT

    script = {0: (0.5, 100), 1: (0.5, 40), 2: (0.5, 60), 3: (0.5, 80)}
    monkeypatch.setattr(HeldOutCheck, "measure", lambda self, model, tokenizer, step: {
        "avg_at_k": script[step][0], "avg_at_k_ci": [0.45, 0.55], "mean_response_tokens": script[step][1],
        "truncation_rate": 0.0})
    config = OPSDStageConfig(gate="all", teacher_weights="ema", ema_rate=0.3, lora_r=4, lora_alpha=8,
                             learning_rate=5e-2, max_steps=3, prompts_per_step=2, rollouts_per_prompt=2,
                             max_completion_length=8, save_steps=100, logging_steps=1, check_every=1,
                             select="shortest_within_tolerance")
    model, tokenizer = load_policy(tiny_folder)
    stage = tmp_path / "opsd"
    out = run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, stage, thinking=True,
                   check_examples=task.examples("test", 4))
    selection = json.loads((stage / "selection.json").read_text())
    assert selection["checkpoint"] == "checkpoints/checkpoint-1"

    def merged(checkpoint):
        return PeftModel.from_pretrained(load_model(tiny_folder), str(stage / "checkpoints" / checkpoint)).merge_and_unload()

    saved = logits_of(load_model(out))
    assert torch.allclose(saved, logits_of(merged("checkpoint-1")), atol=1e-6)
    assert not torch.allclose(saved, logits_of(merged("checkpoint-3")), atol=1e-4)
