"""Loading a config: a YAML file or shipped preset, then `key=value` overrides, into a validated `PipelineConfig`.

A config file is YAML whose keys mirror `PipelineConfig`; anything left out keeps its default, so a
preset is an override file (compare `configs/tiny.yaml` and `configs/qwen3-8b.yaml` to see what
changes with scale). Command-line `key=value` overrides use dotted paths (`opsd.max_steps=10`) and
YAML values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from opsdlab.config.sections import PipelineConfig
from opsdlab.config.values import ConfigError, build

PRESET_DIR = Path(__file__).parents[1] / "configs"


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[keys[-1]] = value


def resolve_preset(path: str | Path) -> Path:
    """A config file, or the name of a shipped preset (`configs/*.yaml`: tiny, tiny-nothink, tiny-search, qwen3-1.7b, qwen3-8b)."""
    candidate = Path(path)
    if candidate.is_file():  # a folder named like a preset (say a run directory) is not a config
        return candidate
    shipped = PRESET_DIR / f"{path}.yaml"
    if shipped.exists():
        return shipped
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {path}: no such file, and not a shipped preset ({', '.join(presets)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    data: dict = {}
    if path is not None:
        source = resolve_preset(path)
        try:
            data = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config {source}: not valid YAML ({error})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config {source}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. opsd.max_steps=10")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return build(PipelineConfig, data, "")


def to_dict(config: PipelineConfig) -> dict:
    """Plain-data form of a config, as written to the run directory."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    data = plain(dataclasses.asdict(config))
    data["arms"] = [{"name": arm.name, **arm.overrides} for arm in config.arms]
    return data


def dump_config(config: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
