"""`opsdlab config show`, task options checked per task at config load, and comma-separated list overrides."""

import dataclasses
import re

import pytest

from opsdlab.cli import build_parser, main
from opsdlab.config import (MEANINGS, PipelineConfig, describe_config, field_comments, field_meaning, load_config)

LINE = re.compile(r"^(?P<mark>[* ]) (?P<key>\S+): (?P<value>.*?)(?:  \(default: (?P<default>.*?)\))?"
                  r"(?: +# (?P<meaning>.*))?$")


def _shown(capsys, *argv) -> dict:
    assert main(["config", "show", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# {' '.join(argv)}: every key; * marks a value that is not the default"
    return {match["key"]: match.groupdict() for match in map(LINE.match, out[1:])}


def test_config_show_lists_every_key_with_value_default_and_meaning(capsys):
    shown = _shown(capsys, "tiny", "opsd.gate=all", "seeds=0,1")
    assert shown["opsd.gate"] == {
        "mark": "*", "key": "opsd.gate", "value": "all", "default": "correct",
        "meaning": "which rollouts are trained on, by outcome: all, correct, incorrect, correct_or_truncated or split "
                   "(gates.GATES)"}
    assert shown["sft.batch_size"] == {
        "mark": "*", "key": "sft.batch_size", "value": "16", "default": "32",
        "meaning": "rows per optimizer step, over all processes and gradient-accumulation steps"}
    assert shown["sft.max_steps"] == {"mark": " ", "key": "sft.max_steps", "value": "800", "default": None,
                                      "meaning": "optimizer steps of the stage"}
    assert shown["seeds"]["value"] == "[0, 1]" and shown["seeds"]["mark"] == "*"
    # A trailing source comment, a comment block above a field, TRL's help for a field passed to it unchanged.
    assert shown["model.init"]["meaning"] == '"tiny": build the offline default; otherwise a Hugging Face model folder or Hub id'
    assert shown["workers"]["meaning"].startswith("Processes that run independent steps side by side")
    assert shown["rlvr.beta"]["meaning"] == "KL coefficient."
    # The task's options are its own option fields, with the task config's defaults.
    assert shown["task.options.min_terms"] == {"mark": "*", "key": "task.options.min_terms", "value": "3",
                                               "default": "4", "meaning": None}
    assert shown["task.options.max_term"]["value"] == "13" and shown["task.options.max_term"]["mark"] == " "
    assert shown["eval.sampling.k"]["value"] == "4" and shown["eval.vllm.in_process"]["value"] == "false"
    assert shown["arms"]["value"] == "[{name: all, gate: all}, {name: correct, gate: correct}, " \
                                     "{name: incorrect, gate: incorrect}]"


def test_every_leaf_of_the_config_is_shown_once():
    keys = [info.key for info in describe_config(load_config("tiny-search"))]
    assert len(keys) == len(set(keys))
    assert {"opsd.lora_r", "rlvr.vllm_mode", "eval.vllm.tensor_parallel_size", "sft.probe_every",
            "task.options.min_numbers", "task.options.check"} <= set(keys)
    assert "task.options" not in keys and "eval.sampling" not in keys


def test_a_key_without_a_comment_or_entry_has_no_meaning():
    @dataclasses.dataclass
    class Section:
        plain: int = 1
        commented: int = 2  # a comment
        # above the field
        below: int = 3

    assert field_comments(Section) == {"commented": "a comment", "below": "above the field"}
    assert field_meaning(Section, "plain") is None


def test_meanings_name_fields_that_exist():
    from opsdlab.config.sections import SamplingConfig, VLLMSettings
    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig, SFTStageConfig
    from opsdlab.config import EvalSection, ModelSection, TaskSection

    classes = {cls.__name__: cls for cls in (PipelineConfig, ModelSection, TaskSection, EvalSection, SamplingConfig,
                                             VLLMSettings, SFTStageConfig, RLVRStageConfig, OPSDStageConfig)}
    for entry in MEANINGS:
        owner, name = entry.split(".")
        assert name in {f.name for f in dataclasses.fields(classes[owner])}, entry


def test_the_trl_help_config_show_keeps_is_the_installed_trls():
    """`config show` imports no TRL: the help it shows for a field passed to TRL unchanged is kept in
    `meanings.TRL_HELP`, which must be the first sentence of the installed TRL's own help."""
    import trl

    from opsdlab.config import stages
    from opsdlab.config.meanings import TRL_FIELDS, TRL_HELP, _first_sentence

    for stage, (trl_name, passed) in TRL_FIELDS.items():
        assert set(passed) <= {f.name for f in dataclasses.fields(getattr(stages, stage))}, stage
        helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(getattr(trl, trl_name))}
        for name in passed:
            if name in helps:  # not generation_backend, which is this project's own
                assert TRL_HELP[trl_name].get(name) == _first_sentence(helps[name]), f"{stage}.{name}"
    assert all(set(kept) <= {name for trl_name, passed in TRL_FIELDS.values() if trl_name == owner for name in passed}
               for owner, kept in TRL_HELP.items())


def test_config_show_options_state_their_defaults():
    config_parser = build_parser()._subparsers._group_actions[0].choices["config"]
    show = config_parser._subparsers._group_actions[0].choices["show"]
    for action in show._actions:
        if action.dest != "help":
            assert "(default:" in action.help or "(required)" in action.help, action.dest


def test_options_of_another_task_are_an_error_naming_task_options(capsys):
    assert main(["pipeline", "--config", "tiny", "task.name=search"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "opsdlab pipeline: error: task.options: unknown option(s) ['max_terms', 'min_terms', 'privileged_style'] for "
        "task 'search'; valid options: ['min_numbers', 'max_numbers', 'max_number', 'give_up_rate', 'mischeck_rate', "
        "'order', 'privileged_fraction', 'check', 'code_seed', 'instruction'] (a preset's options for another task "
        "stay when only task.name is overridden: override task.options as well, e.g. task.options={})")
    assert load_config("tiny", ["task.name=search", "task.options={}"]).task.name == "search"


@pytest.mark.parametrize("overrides, message", [
    (["task.options.min_terms=abc"], "task.options.min_terms: expected an integer, got 'abc' (str)"),
    (["task.options.min_terms=9"], "task.options: synthetic task: need 2 <= min_terms <= max_terms, got 9, 5"),
    (["task.name=chess"], "task.name: unknown task 'chess'; choose one of ['file', 'search', 'synthetic']"),
    (["task.name=file", "task.options={train: a.jsonl, colums: x}"],
     "task.options: unknown option(s) ['colums'] for task 'file'; valid options: ['train', 'columns', 'split'] (a "
     "preset's options for another task stay when only task.name is overridden: override task.options as well, "
     "e.g. task.options={})"),
])
def test_task_options_are_checked_when_the_config_loads(overrides, message):
    from opsdlab.config import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides)
    assert str(error.value) == message


def test_task_option_numbers_written_as_text_are_read_as_numbers():
    assert load_config("tiny", ["task.options.slip_rate=1e-1"]).task.options["slip_rate"] == 0.1


def test_a_list_key_takes_comma_separated_values():
    config = load_config("tiny", ["seeds=0,1", "opsd_seeds=3,4", "stages=sft,rlvr"])
    assert config.seeds == (0, 1) and config.opsd_seeds == (3, 4) and config.stages == ("sft", "rlvr")
    assert load_config("tiny", ["seeds=[2, 5]"]).seeds == (2, 5)
