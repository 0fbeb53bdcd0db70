"""The periodic teacher (CRISP): the student re-copied after every `refresh_steps`-th optimizer step that
updated it, frozen in between, and resumed exactly from a checkpoint.

Unit tests move the student by hand and call `after_step` as the trainer's callback does; the trainer
tests run the real OPSDTrainer for a few steps on the tiny model.
"""

import pytest
import torch
from accelerate import Accelerator
from transformers import TrainerCallback

from opsdlab.modeling.models import load_model
from opsdlab.stages.teacher import PERIODIC_ADAPTER, PERIODIC_STATE_FILE, build_teacher, load_teacher_state, \
    save_teacher_state

from opsd_helpers import ScriptedReward, make_trainer, snapshot

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _nudge(params, generator, scale=1e-2):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_periodic_teacher_is_the_student_at_each_refresh_and_frozen_between(tiny_folder):
    generator = torch.Generator().manual_seed(0)
    student = load_model(tiny_folder)
    teacher = build_teacher("periodic", student, Accelerator(), refresh_steps=3)
    expected = snapshot(student)
    for step in range(1, 8):
        _nudge(student.parameters(), generator)
        teacher.after_step(student)
        if step % 3 == 0:
            expected = snapshot(student)
        got = snapshot(teacher.copy)
        assert _same(got, expected), step
        assert not _same(got, snapshot(student)) or step % 3 == 0  # frozen while the student moves
    assert teacher.steps == 7


def test_periodic_teacher_of_a_fresh_lora_student_starts_at_the_base_and_copies_the_adapter(tiny_folder):
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(0)
    base_logits = load_model(tiny_folder)(input_ids=IDS).logits.detach()
    student = get_peft_model(load_model(tiny_folder), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    teacher = build_teacher("periodic", student, Accelerator(), refresh_steps=2)
    trainable = [p for n, p in student.named_parameters() if ".default." in n]
    expected = {n: p.detach().clone() for n, p in student.named_parameters() if ".default." in n}
    for step in range(1, 6):
        _nudge(trainable, generator)
        teacher.after_step(student)
        if step % 2 == 0:
            expected = {n: p.detach().clone() for n, p in student.named_parameters() if ".default." in n}
        if step == 1:
            with torch.no_grad(), teacher.use(student) as model:
                assert torch.allclose(model(input_ids=IDS).logits, base_logits, atol=1e-6)
        own = dict(student.named_parameters())
        for name, value in expected.items():
            assert torch.equal(own[name.replace(".default.", f".{PERIODIC_ADAPTER}.")], value), (step, name)
    assert all(PERIODIC_ADAPTER not in n for n, p in student.named_parameters() if p.requires_grad)


def test_periodic_state_round_trips_through_a_checkpoint_folder(tmp_path, tiny_folder):
    generator = torch.Generator().manual_seed(0)
    student = load_model(tiny_folder)
    teacher = build_teacher("periodic", student, Accelerator(), refresh_steps=3)
    for _ in range(4):
        _nudge(student.parameters(), generator)
        teacher.after_step(student)
    save_teacher_state(teacher, student, tmp_path)

    restarted = build_teacher("periodic", student, Accelerator(), refresh_steps=3)
    assert not _same(snapshot(restarted.copy), snapshot(teacher.copy))
    load_teacher_state(restarted, student, tmp_path)
    assert restarted.steps == 4 and _same(snapshot(restarted.copy), snapshot(teacher.copy))
    for _ in range(2):  # the next refresh comes after step 6 in both
        _nudge(student.parameters(), generator)
        teacher.after_step(student)
        restarted.after_step(student)
    assert _same(snapshot(restarted.copy), snapshot(student))


def test_refresh_steps_below_one_is_an_error(tiny_folder):
    with pytest.raises(ValueError, match="refresh_steps must be >= 1, got 0"):
        build_teacher("periodic", load_model(tiny_folder), Accelerator(), refresh_steps=0)


# ------------------------------------------------------------------ through the OPSDTrainer
class Record(TrainerCallback):
    """Student and teacher parameters after each optimizer step, once the teacher has been updated
    (added to the trainer after its own teacher-update callback)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.student, self.teacher = {}, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.student[state.global_step] = snapshot(model)
        self.teacher[state.global_step] = snapshot(self.trainer.teacher.copy)


def test_periodic_teacher_through_the_trainer_refreshes_every_k_steps(tmp_path, tiny_folder, task):
    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="periodic", teacher_refresh_steps=2,
                           max_steps=5)
    record = Record(trainer)
    trainer.add_callback(record)
    start = snapshot(trainer.model)
    trainer.train()
    assert trainer.skipped_steps == 0 and sorted(record.student) == [1, 2, 3, 4, 5]
    students = {0: start, **record.student}
    assert all(not _same(students[k], students[k - 1]) for k in range(1, 6))  # every step moved the student
    for step, weights in record.teacher.items():
        assert _same(weights, students[step - step % 2]), step


def test_skipped_steps_do_not_count_toward_a_refresh(tmp_path, tiny_folder, task):
    """Step 2 keeps no rollout (skipped): with refresh_steps=2 the refresh follows step 3, the second
    step that updated the student, not steps 2 and 4."""
    reward = ScriptedReward(lambda call, n: [call != 2] * n)
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=reward, gate="correct", refill_max_rounds=1,
                           teacher_weights="periodic", teacher_refresh_steps=2, max_steps=4)
    record = Record(trainer)
    trainer.add_callback(record)
    start = snapshot(trainer.model)
    trainer.train()
    assert trainer.skipped_steps == 1 and trainer.teacher.steps == 3
    assert _same(record.teacher[2], start)
    assert _same(record.teacher[3], record.student[3]) and _same(record.teacher[4], record.student[3])
    assert not _same(record.student[4], record.student[3])


def _run(stage_dir, tiny_folder, task, *, stop_at=None):
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    return make_trainer(stage_dir, tiny_folder, task, teacher_weights="periodic", teacher_refresh_steps=2,
                        max_steps=5, save_steps=3, callbacks=[Stop()])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_resumed_periodic_arm_has_the_teacher_of_an_uninterrupted_one(tmp_path, tiny_folder, task):
    """Checkpoint after step 3: step 4 trains against the copy made after step 2 (restored weights), and
    the refresh after step 4 needs the restored step count."""
    straight = _run(tmp_path / "straight", tiny_folder, task)
    straight.train()

    _run(tmp_path / "resumed", tiny_folder, task, stop_at=3).train()
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / PERIODIC_STATE_FILE).exists()
    resumed = _run(tmp_path / "resumed", tiny_folder, task)
    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["teacher"] = snapshot(resumed.teacher.copy)
            seen["steps"] = resumed.teacher.steps

    resumed.add_callback(AtStart())
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert seen["steps"] == 3 and not _same(seen["teacher"], snapshot(load_model(tiny_folder)))
    assert torch.allclose(_logits(resumed.model), _logits(straight.model), atol=1e-5)
    assert torch.allclose(_logits(resumed.teacher.copy), _logits(straight.teacher.copy), atol=1e-5)


def test_resuming_a_periodic_arm_without_its_teacher_state_is_an_error(tmp_path, tiny_folder, task):
    _run(tmp_path, tiny_folder, task, stop_at=3).train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-3"
    (checkpoint / PERIODIC_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=PERIODIC_STATE_FILE):
        _run(tmp_path, tiny_folder, task).train(resume_from_checkpoint=str(checkpoint))
