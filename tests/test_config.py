import pytest

from opsdlab.config import ConfigError, PipelineConfig, load_config, resolve_preset, to_dict


def test_defaults_are_the_tiny_preset():
    config = load_config("tiny")
    assert config.model.init == "tiny"
    assert [arm.name for arm in config.arms] == ["all", "correct", "incorrect"]


def test_dotted_overrides_and_arm_configs():
    config = load_config("tiny", ["opsd.max_steps=3", "opsd_seeds=[0, 1]", "eval.sampling.k=2",
                                  "arms=[{name: ctrl, gate: correct, teacher_context: concise}]"])
    assert config.opsd.max_steps == 3 and config.opsd_seeds == (0, 1) and config.eval.sampling.k == 2
    arm = config.arm_config(config.arms[0])
    assert arm.gate == "correct" and arm.teacher_context == "concise" and arm.max_steps == 3


@pytest.mark.parametrize("override, message", [
    ("opsd.gaet=correct", "opsd: unknown key"),
    ("opsd.gate=wrong_only", "gate must be one of"),
    ("arms=[{name: x, divergence: kl}]", "arms.x"),
    ("stages=[sft, ppo]", "unknown"),
    ("rlvr.group_size=1", "group_size"),
    ("eval.sampling.temperature=-1", "temperature"),
    ("sft.probe_every=-1", "sft: need probe_every >= 0"),
    ("sft.probe_temperature=-0.5", r"sft: need probe_every >= 0.*got 0, 100, 1 and -0.5"),
    ("sft.batching=sorted", r"sft: batching must be one of \['length_grouped', 'random', 'rebalanced'\], got 'sorted'"),
    ("nonsense", "key=value"),
    ("model.dtype=float8", r"model.dtype: expected one of float32, bfloat16, float16, got 'float8'"),
    ("model.size=huge", r"model.size: expected one of tiny, micro, shallow, small, got 'huge'"),
    ("eval.dtype=half", r"eval.dtype: expected one of float32, bfloat16, float16 or null, got 'half'"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("sft.learning_rate=abc", "sft.learning_rate: expected a number, got 'abc' (str)"),
    ("opsd.max_steps=1.5", "opsd.max_steps: expected an integer, got 1.5 (float)"),
    ("opsd.max_steps=true", "opsd.max_steps: expected an integer, got True (bool)"),
    ("rlvr.dynamic_sampling=maybe", "rlvr.dynamic_sampling: expected a boolean (true/false), got 'maybe' (str)"),
    ("opsd.clip_tau=abc", "opsd.clip_tau: expected a number or null, got 'abc' (str)"),
    ("eval.sampling.k=abc", "eval.sampling.k: expected an integer, got 'abc' (str)"),
    ("opsd.gate=3", "opsd.gate: expected a string, got 3 (int)"),
    ("stages=sft", "stages: expected a list, got 'sft' (str)"),
    ("arms=[{name: x, max_steps: ten}]", "arms.x.max_steps: expected an integer, got 'ten' (str)"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [override])
    assert str(error.value) == message


def test_numbers_that_yaml_reads_as_strings_are_numbers():
    """YAML 1.1 reads 1e-6 (no dot) as a string; a float field takes it as the number."""
    config = load_config("tiny", ["opsd.learning_rate=1e-6", "rlvr.epsilon_high=null", "sft.learning_rate=3"])
    assert config.opsd.learning_rate == 1e-6 and config.rlvr.epsilon_high is None and config.sft.learning_rate == 3


@pytest.mark.parametrize("override, message", [
    ("opsd.gate=bogus", "opsd: gate must be one of ['all', 'correct', 'correct_or_truncated', 'incorrect', "
                        "'split'], got 'bogus'"),
    ("arms=[{name: x, gate: bogus}]", "arms.x: gate must be one of ['all', 'correct', 'correct_or_truncated', "
                                      "'incorrect', 'split'], got 'bogus'"),
    ("eval.sampling.temperature=-1", "eval.sampling: temperature must be >= 0, got -1"),
    ("rlvr.group_size=1", "rlvr: group_size must be >= 2 (group-centred advantages), got 1"),
])
def test_an_error_names_its_section_once(override, message):
    """A section's own label is not repeated after the key (no `opsd: opsd: gate ...`)."""
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [override])
    assert str(error.value) == message


def test_batches_are_checked_against_the_number_of_processes():
    config = load_config("qwen3-8b")
    assert config.opsd.rollouts_per_prompt == 1 and config.opsd.prompts_per_step == 32
    for processes in (1, 2, 4, 8, 16, 32):
        config.check_batches(processes)
    with pytest.raises(ConfigError) as error:
        config.check_batches(3)
    assert str(error.value) == ("arms.all: prompts_per_step (32) must be a multiple of the number of processes (3): "
                                "each process generates whole groups of rollouts")
    with pytest.raises(ConfigError, match=r"^sft: batch_size \(16\) = 16 rows"):
        load_config("tiny", ["sft.gradient_accumulation_steps=3"]).check_batches(1)
    load_config("tiny").check_batches(1)


def test_missing_preset_lists_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="tiny"):
        resolve_preset(tmp_path / "nope.yaml")


def test_presets_load_and_round_trip(tmp_path):
    import yaml

    for name in ("tiny", "tiny-nothink", "qwen3-8b"):
        config = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(config)))
        assert load_config(path) == config
    assert load_config("tiny-nothink").task.thinking is False
    assert isinstance(load_config("qwen3-8b"), PipelineConfig)


def test_the_one_gpu_preset_splits_its_batches_for_one_process():
    config = load_config("qwen3-1.7b")
    # float32 weights (an lr-1e-6 step survives them; bf16 compute on the GPU), evaluated in bf16
    assert config.stages == ("rlvr", "opsd") and (config.model.dtype, config.eval.dtype) == ("float32", "bfloat16")
    config.check_batches(1)
    assert config.rlvr.per_device_batch(1) == 4  # 32 prompts x 8 rollouts over 64 accumulation steps
    for arm in config.arms:
        arm_config = config.arm_config(arm)
        assert (arm_config.prompts_per_step, arm_config.rollouts_per_prompt, arm_config.learning_rate) == (32, 1, 1e-6)
        assert arm_config.per_device_batch(1) == 4


def test_the_cpu_recipe_for_ones_own_model_is_the_preset_and_three_overrides(tmp_path, tiny_folder, monkeypatch):
    """`opsdlab pipeline --config cpu-own-model model.init=DIR task.options.train=train.jsonl
    "eval.sets=[test.jsonl]"` (README, docs/configuration.md): those three are all it lacks, and it needs no extra."""
    import json

    from opsdlab.run import preflight

    monkeypatch.setattr(preflight, "installed", lambda module: False)  # no vLLM, no tracker
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        preflight.check_inputs(load_config("cpu-own-model"))
    assert "3 thing(s)" in str(error.value) and "model.init: model" in str(error.value)
    assert "task.options.train: train.jsonl" in str(error.value) and "eval.sets: test.jsonl" in str(error.value)
    row = {"problem": "What is 2+3?", "solution": "2+3=5.", "answer": "5"}
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    config = load_config("cpu-own-model", [f"model.init={tiny_folder}", "task.options.train=train.jsonl",
                                           "eval.sets=[test.jsonl]"])
    preflight.check_inputs(config)
    config.check_batches(1)
    assert config.stages == ("sft", "rlvr", "opsd") and [arm.name for arm in config.arms] == ["all", "correct", "incorrect"]
    assert (config.task.name, config.model.dtype, config.eval.backend, config.workers) == ("file", "float32", "transformers", 1)
    assert not config.rlvr.use_vllm and not config.opsd.use_vllm
    # a pretrained model's learning rates, not the tiny preset's from-scratch ones
    assert (config.sft.learning_rate, config.rlvr.learning_rate, config.opsd.learning_rate) == (1e-5, 1e-6, 1e-6)
