"""The config layer names the choices whose code lives in higher layers (`config.choices`, `config.tasks`,
`config.methods`), so that a config is checked without importing torch or TRL. Each list of names must
be the keys of the registry that implements them: a choice added to one and not the other fails here."""

import importlib

import pytest

from opsdlab.config import choices, methods, tasks

# (what the config layer accepts, the module and name of the registry that implements it)
REGISTRIES = {
    "gates": (choices.GATES, "opsdlab.loss.gates", "GATES"),
    "divergences": (choices.DIVERGENCES, "opsdlab.loss.divergences", "DIVERGENCES"),
    "teacher weights": (choices.TEACHER_WEIGHTS, "opsdlab.stages.teacher", "TEACHER_WEIGHTS"),
    "position weightings": (choices.POSITION_WEIGHTINGS, "opsdlab.loss.positions", "POSITION_WEIGHTINGS"),
    "teacher contexts": (choices.CONTEXT_READS, "opsdlab.tasks.prompts", "TEACHER_CONTEXTS"),
    "length rewards": (choices.LENGTH_REWARDS, "opsdlab.loss.rewards", "LENGTH_REWARDS"),
    "stop rules": (choices.STOP_RULES, "opsdlab.stages.checks", "STOP_RULES"),
    "select rules": (choices.SELECT_RULES, "opsdlab.stages.checks", "SELECT_RULES"),
    "evaluation backends": (choices.BACKENDS, "opsdlab.evaluation.evaluate", "BACKENDS"),
    "tiny model sizes": (choices.TINY_SIZES, "opsdlab.modeling.models", "TINY_SIZES"),
    "tasks": (tasks.OPTIONS, "opsdlab.tasks", "TASKS"),
    "compaction methods": (methods.METHODS, "opsdlab.stages.methods", "TRAINING"),
    "contrast variants": (methods.CONTRAST_VARIANTS, "opsdlab.loss.contrastive", "VARIANTS"),
}


@pytest.mark.parametrize("registry", sorted(REGISTRIES))
def test_the_config_names_every_choice_of_the_registry_and_no_other(registry):
    names, module, attribute = REGISTRIES[registry]
    implemented = getattr(importlib.import_module(module), attribute)
    assert sorted(names) == sorted(implemented), f"{registry}: the config layer's names differ from {module}.{attribute}"


def test_every_weight_dtype_is_a_torch_dtype():
    import torch

    assert all(isinstance(getattr(torch, name, None), torch.dtype) for name in choices.DTYPES)
