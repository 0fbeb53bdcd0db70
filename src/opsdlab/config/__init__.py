"""Pipeline configuration: typed dataclasses with the tiny CPU values as defaults, validated at load.

A config file is YAML whose keys mirror `PipelineConfig`; anything left out keeps its default, so a
preset is an override file (compare `configs/tiny.yaml` and `configs/qwen3-8b.yaml` to see what
changes with scale). Command-line `key=value` overrides use dotted paths (`opsd.max_steps=10`) and
YAML values. Unknown keys, values of the wrong type, bad choices and impossible sizes are errors
naming the key (and, for a wrong type, the type expected).

This layer is pure data: it imports no torch, transformers, TRL or vLLM, so a config is loaded,
checked and shown at once; the layers above read their settings from here. The modules, lowest
first: `choices` (the names of choices implemented in higher layers, and their plain data), `values`
(the error type, type checks, building a dataclass from YAML data), `ranges` (numeric ranges, batch
splits), `divergence`, `methods` (what a compaction method sets and needs of an arm), `stages` (SFT,
RLVR, OPSD), `columns` and `tasks` (task options), `sections` (every section and `PipelineConfig`),
`load` (files, presets, overrides), `meanings` (`opsdlab config show`), `memory` (each stage's
predicted peak memory from the model's shape and the settings: `opsdlab plan`).
"""

from opsdlab.config.choices import STAGES
from opsdlab.config.load import PRESET_DIR, dump_config, load_config, resolve_preset, to_dict
from opsdlab.config.meanings import MEANINGS, KeyInfo, describe_config, field_comments, field_meaning, format_keys
from opsdlab.config.sections import ArmSection, EvalSection, ModelSection, PipelineConfig, TaskSection
from opsdlab.config.values import ConfigError, check_value, located

__all__ = ["STAGES", "PRESET_DIR", "dump_config", "load_config", "resolve_preset", "to_dict", "MEANINGS", "KeyInfo",
           "describe_config", "field_comments", "field_meaning", "format_keys", "ArmSection", "EvalSection",
           "ModelSection", "PipelineConfig", "TaskSection", "ConfigError", "check_value", "located"]
