"""SFT through TRL on the tiny model: the loss falls and a short run solves an easy variant above chance."""

import json

import torch

from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import evaluate
from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy
from opsdlab.config.stages import SFTStageConfig
from opsdlab.stages.sft import run_sft
from opsdlab.tasks import build_task
from opsdlab.tasks.verifier import VerifierConfig

EASY = {"min_terms": 2, "max_terms": 2, "max_term": 5, "slip_rate": 0.0, "recheck_rate": 0.0,
        "filler_rate": 0.0, "restart_rate": 0.0, "privileged_fraction": 0.0}


def test_sft_lowers_loss_and_beats_chance(tmp_path):
    task = build_task("synthetic", EASY)
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    model = build_tiny_model(tokenizer, seed=0)
    config = SFTStageConfig(rows=512, max_steps=120, batch_size=16, learning_rate=3e-3, logging_steps=10,
                            save_steps=1000)
    out = run_sft(model, tokenizer, task.sft_rows(tokenizer, config.rows), config, tmp_path / "sft")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    trained, tokenizer = load_policy(out)
    _, summary = evaluate(trained, tokenizer, task.examples("train", 25), VerifierConfig(compare="exact"),
                          SamplingConfig(k=1, temperature=0.0, max_new_tokens=24))
    # Sums of two numbers in 1..5: the best constant guess (6) is right on at most 5 of 25 problems.
    assert summary["avg_at_k"] > 0.4


def _sft_trainer(batching: str, tmp_path, *, rows: int = 256, batch_size: int = 16,
                 gradient_accumulation_steps: int = 1, max_steps: int = 8, save_steps: int = 1000, seed: int = 0):
    """The pipeline's SFT trainer on synthetic rows, with the batching under test."""
    from datasets import Dataset
    from opsdlab.stages.sft import SFTStageTrainer, sft_args

    task = build_task("synthetic")
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    config = SFTStageConfig(rows=rows, max_steps=max_steps, batch_size=batch_size, batching=batching,
                            gradient_accumulation_steps=gradient_accumulation_steps, save_steps=save_steps,
                            logging_steps=1000)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in task.sft_rows(tokenizer, config.rows)])
    return SFTStageTrainer(model=build_tiny_model(tokenizer, seed=seed), processing_class=tokenizer,
                      args=sft_args(config, tmp_path / batching, seed=0, eos_token=tokenizer.eos_token),
                      train_dataset=dataset)


def _epoch_batches(trainer, epoch: int) -> list[dict]:
    """The micro-batches the trainer's dataloader draws in one epoch, as the training loop sets it."""
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    inner = getattr(loader.batch_sampler, "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
    return list(loader)


def _padding_share(batches: list[dict]) -> float:
    masks = [batch["attention_mask"] for batch in batches]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def _rows(batch: dict) -> list[tuple]:
    """Each row of a padded batch as its unpadded token ids."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _mean_length_span(batches: list[dict], per_step: int) -> float:
    """Mean over optimizer steps of (longest - shortest row) in tokens."""
    spans = []
    for start in range(0, len(batches), per_step):
        lengths = [int(n) for batch in batches[start:start + per_step] for n in batch["attention_mask"].sum(1)]
        spans.append(max(lengths) - min(lengths))
    return sum(spans) / len(spans)


def test_length_grouped_batching_cuts_padding(tmp_path):
    random_share = _padding_share(_epoch_batches(_sft_trainer("random", tmp_path), 0)[:8])
    grouped_share = _padding_share(_epoch_batches(_sft_trainer("length_grouped", tmp_path), 0)[:8])
    assert random_share > 0.15  # the synthetic rows vary in length
    assert grouped_share < 0.6 * random_share  # 0.14 against 0.27 with these seeds


def test_rebalanced_batching_keeps_random_steps_and_cuts_padding(tmp_path):
    """`rebalanced`: each optimizer step is still `batch_size` rows drawn at random, split into
    micro-batches of similar length; every row once per epoch, a new order each epoch."""
    trainer = _sft_trainer("rebalanced", tmp_path, batch_size=16, gradient_accumulation_steps=2)
    epochs = [_epoch_batches(trainer, epoch) for epoch in (0, 1)]
    dataset_rows = sorted(tuple(ids) for ids in trainer.train_dataset["input_ids"])
    for batches in epochs:
        assert len(batches) == 2 * (256 // 16)
        assert sorted(row for batch in batches for row in _rows(batch)) == dataset_rows
        steps = [batches[i]["input_ids"].shape[0] + batches[i + 1]["input_ids"].shape[0]
                 for i in range(0, len(batches), 2)]
        assert steps == [16] * len(steps)
        # Micro-batch sizes vary with length: short rows go in larger micro-batches.
        assert len({batch["input_ids"].shape[0] for batch in batches}) > 1
    random_epoch = _epoch_batches(_sft_trainer("random", tmp_path, batch_size=16), 0)
    # A step spans short and long rows as a random batch does (length-grouped steps would not).
    assert _mean_length_span(epochs[0], per_step=2) > 0.7 * _mean_length_span(random_epoch, per_step=1)
    first_steps = [{row for batch in batches[:2] for row in _rows(batch)} for batches in epochs]
    assert first_steps[0] != first_steps[1]
    assert _padding_share(epochs[0]) < 0.7 * _padding_share(random_epoch)  # 0.16 against 0.28 here


def test_rebalanced_step_has_the_gradient_of_one_batch(tmp_path):
    """Two length-balanced micro-batches of one step give the gradient of all its rows in one batch:
    the loss is normalised by the step's completion tokens, not per micro-batch."""
    from transformers import TrainerCallback

    class FirstGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.grads = [p.grad.detach().clone() for p in model.parameters()]

    grads = {}
    for batching, accumulation in (("random", 1), ("rebalanced", 2)):
        # 32 rows and a batch of 32: the first step holds every row, whatever the order.
        trainer = _sft_trainer(batching, tmp_path, rows=32, batch_size=32,
                               gradient_accumulation_steps=accumulation, max_steps=1)
        trainer.args.max_grad_norm = 0.0  # compare the gradients themselves, not their clipped direction
        trainer.add_callback(clock := FirstGradient())
        trainer.train()
        grads[batching] = clock.grads
    for one_batch, balanced in zip(grads["random"], grads["rebalanced"]):
        torch.testing.assert_close(balanced, one_batch, rtol=1e-4, atol=1e-6)


def test_rebalanced_resume_across_an_epoch_matches_an_uninterrupted_run(tmp_path):
    """4 steps per epoch; resuming from step 6 (inside epoch 2) ends on the same weights."""
    def trainer():
        return _sft_trainer("rebalanced", tmp_path, rows=32, batch_size=8, gradient_accumulation_steps=2,
                            max_steps=8, save_steps=3)

    straight = trainer()
    straight.train()
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "rebalanced" / "checkpoints" / "checkpoint-6"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _probe_run(tmp_path, name: str, probe_every: int):
    """SFT of 10 steps over 64 rows, probed every `probe_every` steps (0: never), with attention dropout:
    training then draws from torch's generator, which generation reseeds."""
    from opsdlab.stages.sft import TeacherProbe

    task = build_task("synthetic")
    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    config = SFTStageConfig(rows=64, max_steps=10, batch_size=8, save_steps=1000, logging_steps=1000)
    stage_dir = tmp_path / name
    probes = [TeacherProbe(stage_dir / "probe.jsonl", task.examples("test", 4), VerifierConfig(compare="exact"),
                           ["none", "solution"], every=probe_every, max_new_tokens=8, k=2, temperature=0.6)
              ] if probe_every else []
    model = build_tiny_model(tokenizer, seed=0)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    torch.manual_seed(0)
    out = run_sft(model, tokenizer, task.sft_rows(tokenizer, config.rows), config, stage_dir, callbacks=probes)
    return load_policy(out)[0], stage_dir / "probe.jsonl", probes


def test_the_teacher_probe_records_each_step_and_does_not_change_training(tmp_path):
    """Sampled probes at steps 3, 6 and 9: the probed run ends on the unprobed run's weights, although
    generation reseeds and draws from torch's generator and the dropout masks come from it."""
    plain, _, _ = _probe_run(tmp_path, "plain", 0)
    probed, path, (probe,) = _probe_run(tmp_path, "probed", 3)
    for a, b in zip(plain.parameters(), probed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["context"]) for r in records] == [(s, c) for s in (3, 6, 9) for c in ("none", "solution")]
    assert all(0 <= r["accuracy"] <= 1 and r["problems"] == 4 and r["k"] == 2 for r in records)

    # A resumed run (a new probe on the same file) does not probe a step twice.
    from types import SimpleNamespace

    from opsdlab.stages.sft import TeacherProbe

    resumed = TeacherProbe(path, probe.examples, probe.verifier, probe.contexts, every=3, max_new_tokens=8)
    _, tokenizer = load_policy(path.parent / "model")
    state = SimpleNamespace(global_step=6, is_world_process_zero=True)
    resumed.on_step_end(None, state, None, model=probed, processing_class=tokenizer)
    assert len(path.read_text().splitlines()) == 6


def test_the_teacher_probe_refuses_sharded_weights(tmp_path):
    from types import SimpleNamespace

    import pytest

    from opsdlab.stages.sft import TeacherProbe

    probe = TeacherProbe(tmp_path / "probe.jsonl", [], VerifierConfig(), ["none"], every=10)
    probe.on_train_begin(SimpleNamespace(world_size=2, deepspeed=None, fsdp=None), None, None)  # DDP is fine
    for sharded in ({"deepspeed": "zero3.json", "fsdp": None}, {"deepspeed": None, "fsdp": "full_shard"}):
        with pytest.raises(ValueError, match="probe_every=0 with DeepSpeed or FSDP"):
            probe.on_train_begin(SimpleNamespace(world_size=2, **sharded), None, None)


def test_the_report_tables_the_teacher_probe(tmp_path):
    from opsdlab.report.probe import probe_seed_table, probe_table

    (tmp_path / "sft").mkdir()
    records = [{"step": 50, "context": "none", "accuracy": 0.25, "problems": 100},  # written before k was
               {"step": 50, "context": "solution", "accuracy": 0.5, "problems": 100},
               {"step": 100, "context": "none", "accuracy": 0.5, "problems": 100},
               {"step": 100, "context": "solution", "accuracy": 0.375, "problems": 100}]
    (tmp_path / "sft" / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = probe_table(tmp_path)
    assert table[0] == "Greedy accuracy on 100 held-out problems during SFT."
    assert table[-2:] == ["| 50 | 0.250 | 0.500 | +25.0 pp |", "| 100 | 0.500 | 0.375 | -12.5 pp |"]
    assert probe_table(tmp_path / "nothing") == []
    seed_table = probe_seed_table({1: tmp_path / "nothing", 0: tmp_path})
    assert seed_table[0] == "Greedy accuracy on 100 held-out problems, per seed."
    assert seed_table[-2:] == ["| 50 | 0.250 / 0.500 (+25.0 pp) |", "| 100 | 0.500 / 0.375 (-12.5 pp) |"]
    sampled = {**records[0], "k": 4, "temperature": 0.6}
    (tmp_path / "sft" / "probe.jsonl").write_text(json.dumps(sampled) + "\n")
    assert probe_table(tmp_path)[0] == "avg@4 at temperature 0.6 on 100 held-out problems during SFT."
