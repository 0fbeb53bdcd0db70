"""The memory plan (`config.memory`, `opsdlab plan`, the pre-flight line): its exact terms by hand, its
prediction against the live bytes of a real step on the CPU, the command's output and errors."""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from opsdlab.cli import main
from opsdlab.config import load_config
from opsdlab.config.memory import (MODEL_SHAPES, ModelShape, Setting, lora_parameters, model_shape, parse_size,
                                   plan_stage, state_terms)
from opsdlab.run import pipeline, preflight

# hidden 8, intermediate 16, 2 layers, 2 heads of 4, 1 kv head, vocabulary 32, tied
SMALL = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=32, tied=True)


def test_parameters_of_a_small_shape_by_hand():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, q/k norms 4 + 4, MLP 3 x 8 x 16 = 384, two norms 16
    assert SMALL.per_layer == 192 + 8 + 384 + 16
    assert SMALL.parameters == 32 * 8 + 2 * 600 + 8  # embedding (tied head), layers, final norm
    assert replace(SMALL, tied=False).parameters == SMALL.parameters + 32 * 8
    # The published counts: Qwen3-1.7B 1.7B (1.4B without the embedding), Qwen3-8B 8.2B (6.95B without).
    assert round(MODEL_SHAPES["Qwen3-1.7B"].parameters / 1e9, 2) == 1.72
    assert round(MODEL_SHAPES["Qwen3-8B"].parameters / 1e9, 2) == 8.19


@pytest.mark.parametrize("dtype_bytes", [4, 2])
def test_weights_gradients_and_adamw_state_per_dtype(dtype_bytes):
    p = SMALL.parameters
    s = Setting(stage="rlvr", shape=SMALL, rows=1, prompt=4, completion=4, weight_bytes=dtype_bytes)
    assert state_terms(s) == {"weights": p * dtype_bytes, "gradients": p * dtype_bytes,
                              "optimizer": 2 * p * dtype_bytes}
    zero2 = state_terms(replace(s, zero=2, processes=4))  # float32 moments and master weights, partitioned
    assert zero2 == {"weights": p * dtype_bytes, "gradients": p * dtype_bytes // 4,
                     "optimizer": p * (8 + (4 if dtype_bytes == 2 else 0)) // 4}


def test_teacher_copy_ema_shadow_and_lora():
    p = SMALL.parameters
    opsd = Setting(stage="opsd", shape=SMALL, rows=1, prompt=4, completion=4, weight_bytes=2)
    assert state_terms(opsd)["teacher"] == 2 * p and "ema_shadow" not in state_terms(opsd)
    ema = state_terms(replace(opsd, teacher="ema"))
    assert ema["teacher"] == 2 * p and ema["ema_shadow"] == 4 * p  # float32 shadow of bf16 weights
    assert "ema_shadow" not in state_terms(replace(opsd, teacher="ema", weight_bytes=4))  # the copy is the shadow
    lora = state_terms(replace(opsd, lora_r=2))
    trainable = 2 * 2 * ((8 + 8) * 2 + (8 + 4) * 2 + 3 * (8 + 16))  # layers x r x (q, o, k, v, MLP in + out)
    assert lora_parameters(SMALL, 2) == trainable
    assert lora == {"weights": 2 * p, "gradients": 2 * trainable, "optimizer": 4 * trainable}
    assert "teacher" not in state_terms(replace(opsd, teacher="live"))


def test_gradients_count_from_the_second_micro_batch_or_at_the_end_of_the_backward():
    s = Setting(stage="rlvr", shape=MODEL_SHAPES["Qwen3-1.7B"], rows=2, prompt=64, completion=256, weight_bytes=2,
                accumulation=16)
    assert plan_stage(s)["gradients"] == MODEL_SHAPES["Qwen3-1.7B"].parameters * 2
    short = plan_stage(replace(s, rows=16, completion=128, accumulation=1))
    # One micro-batch on a small batch: the peak is the end of the backward, every gradient and the tied
    # embedding's gradient being added to the head's.
    assert set(short) == {"weights", "gradients", "optimizer", "tied_embedding_gradient", "total"}


def test_the_plan_is_within_ten_percent_of_a_real_step_on_the_cpu(tmp_path):
    """A real GRPO step (the trainer's own loss, backward and AdamW step) of a one-layer model with the
    real vocabulary and a small hidden size, its live tensor bytes counted as they are allocated."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch

    import real_shapes

    shape = ModelShape(hidden=128, intermediate=384, layers=1, heads=2, kv_heads=1, head_dim=64, vocab=151936,
                       tied=True)
    built = real_shapes.trainers(tmp_path, stages=("grpo",))
    record = real_shapes.measure("grpo", shape, 1, 512, 1, torch.bfloat16, False, built)
    record["model"] = "small"
    planned = plan_stage(real_shapes.setting_of(record, shape))["total"]
    assert abs(planned / record["peak_bytes"] - 1) < 0.10, (planned, record["peak_bytes"])


def test_plan_prints_every_stage_and_a_verdict_for_80_and_141_gb_without_torch(capsys):
    start = time.perf_counter()
    assert main(["plan", "qwen3-1.7b"]) == 0
    out = capsys.readouterr().out
    assert time.perf_counter() - start < 3
    for stage in ("rlvr:", "opsd (all, correct, incorrect):", "eval:"):
        assert stage in out
    assert out.count("80 GB:") == out.count("141 GB:") == 3
    assert "the known shape of Qwen3-1.7B" in out


def test_plan_names_what_would_make_a_stage_fit(capsys):
    assert main(["plan", "qwen3-8b", "--processes", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "would fit with" in out


def test_plan_reads_a_model_folders_config_json(tmp_path, capsys):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True}))
    assert model_shape(str(folder)) == (MODEL_SHAPES["Qwen3-0.6B"], str(folder / "config.json"))
    assert main(["plan", "qwen3-8b", f"model.init={folder}"]) == 0
    assert "0.60B parameters" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["plan", "no-such-preset"], "config no-such-preset: no such file, and not a shipped preset"),
    (["plan", "qwen3-1.7b", "rlvr.max_completion_lenght=4"], "max_completion_lenght"),
    (["plan", "qwen3-1.7b", "model.init=SomeOtherModel"], "model.init: SomeOtherModel has no config.json here"),
    (["plan", "qwen3-1.7b", "--gpu-memory", "lots"], "could not convert"),
])
def test_plan_errors_are_one_line(arguments, message, capsys):
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("opsdlab plan: error:")


def test_parse_size():
    assert parse_size("80GB") == 80e9 and parse_size("80GiB") == 80 * 2**30 and parse_size("141") == 141e9


def test_preflight_says_per_stage_whether_it_fits_the_gpu_it_sees():
    config = load_config("qwen3-8b", ["opsd.max_completion_length=16384"])
    lines = preflight.memory_forecast(config, 80e9)
    assert len(lines) == 2 and lines[0].startswith("warning: memory plan: opsd") and "does not fit" in lines[0]
    assert lines[1].startswith("memory plan: eval")
    assert preflight.memory_forecast(config, None) == []  # no GPU: nothing
    assert preflight.memory_forecast(load_config("tiny"), 80e9) == []


def test_the_pipeline_prints_the_forecast_before_any_model_loads(monkeypatch, capsys):
    import torch

    class Loaded(Exception):
        pass

    monkeypatch.setattr(pipeline, "check_inputs", lambda config: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=80e9))
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):
        pipeline.run_seeds(load_config("qwen3-8b", ["opsd.max_completion_length=16384"]))
    assert "warning: memory plan: opsd (all, correct, incorrect)" in capsys.readouterr().out
