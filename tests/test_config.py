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
    ("nonsense", "key=value"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


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
