"""`opsdlab config show`: every key of a resolved config with its value, default and meaning.

A field's meaning is the `# comment` on its declaration, else its entry in `MEANINGS`, else, for a
field passed to TRL unchanged, the first sentence of TRL's help for it (`TRL_HELP`, kept here so
that showing a config does not import TRL; a test compares it with TRL's own).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass

import yaml

from opsdlab.config.sections import PipelineConfig, TaskSection
from opsdlab.config.stages import VLLM_FIELDS
from opsdlab.config.tasks import OPTIONS


@dataclass(frozen=True)
class KeyInfo:
    """One dotted config key: its value, its default (the dataclass default) and what it means (None: unknown)."""

    key: str
    value: object
    default: object
    meaning: str | None

    @property
    def changed(self) -> bool:
        return _plain(self.value) != _plain(self.default)


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(?=\s+[A-Z`(]|$)", text)
    return match.group(1) if match else text


def _comments_in(source: str, names: set[str]) -> dict[str, str]:
    """`# comment`s of the fields declared in one class's source: the comment after the field, else the
    comment lines right above it (the first sentence, when a block introduces a group of fields)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    # Lines of a string that is a statement of its own (a docstring), not a field's default value.
    starts = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT)
    in_strings = {line for before, tok in zip([None, *tokens], tokens)
                  if tok.type == tokenize.STRING and (before is None or before.type in starts)
                  for line in range(tok.start[0], tok.end[0] + 1)}
    body = re.compile(r"^( +)\S")
    field_line = re.compile(r"^(\w+)\s*:")
    indent = None
    found, block = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        margin = body.match(line)
        if number == 1 or not margin or number in in_strings:
            block = [] if number not in comments else block
            continue
        indent = indent or margin.group(1)
        if margin.group(1) != indent:
            block = []
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(comments[number])
            continue
        name = field_line.match(stripped)
        if name and name.group(1) in names:
            text = comments.get(number) or (_first_sentence(" ".join(block)) if block else None)
            if text:
                found[name.group(1)] = text
        block = []
    return found


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """Field name -> the `# comment` on its declaration in the source of `cls` or a dataclass it extends."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        found.update(_comments_in(source, set(vars(klass).get("__annotations__", {}))))
    return found


# Meanings of the fields whose declaration carries no comment, keyed by "Class.field". Written from
# the code that reads each field; a key in neither place shows no meaning.
MEANINGS = {
    "PipelineConfig.run_dir": "where the run writes config.yaml, stage folders, evaluations and the report",
    "PipelineConfig.seed": "the pipeline seed: the base model's init, the task's problems, every stage's seed",
    "PipelineConfig.stages": "stages to train, in order: sft, rlvr, opsd",
    "PipelineConfig.arms": "the arms from the last stage: each a name, a compaction method (default opsd) and "
                           "options that replace opsd.* for that arm",
    "PipelineConfig.opsd_seeds": "each OPSD arm is trained once per seed here (folders <arm>-s<seed>)",
    "ModelSection.trust_remote_code": "let transformers run code shipped with the model folder",
    "TaskSection.name": "the task: synthetic, search or file (opsdlab.tasks.TASKS)",
    "TaskSection.options": "the task's own options (task.options.* below)",
    "TaskSection.thinking": "render prompts with thinking on (the chat template's enable_thinking)",
    "EvalSection.columns": "column mapping for file evaluation sets, e.g. problem=question,answer=final",
    "EvalSection.problems": "held-out problems per evaluation set",
    "EvalSection.greedy": "also evaluate every checkpoint greedily (k 1, temperature 0): the <set>-greedy results",
    "EvalSection.teacher_check": "evaluate the OPSD teacher's prompt on the OPSD start checkpoint "
                                  "(<set>-teacher-<context>)",
    "SamplingConfig.k": "samples per problem (avg@k, pass@k, maj@k)",
    "SamplingConfig.temperature": "sampling temperature; 0 is greedy (then k must be 1)",
    "SamplingConfig.top_p": "nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1]",
    "SamplingConfig.max_new_tokens": "response length cap in tokens; a response that reaches it counts as truncated",
    "SamplingConfig.batch_size": "prompts generated together (transformers backend)",
    "SamplingConfig.seed": "seed of the sampling's random draws",
    "VLLMSettings.tensor_parallel_size": "GPUs that one model replica is sharded over",
    "VLLMSettings.data_parallel_size": "engine replicas, each in its own process on its own GPUs and share of the "
                                       "prompts",
    "VLLMSettings.gpu_memory_utilization": "fraction of GPU memory (on CPU: of the NUMA node's RAM) vLLM takes for "
                                           "weights and KV cache",
    "VLLMSettings.enforce_eager": "no CUDA graphs; null: eager on CPU, CUDA graphs on GPU",
    "VLLMSettings.max_model_len": "vLLM's context length; null: the model's",
    "VLLMSettings.in_process": "run vLLM's engine and model in this process (faster start; for CPUs and tests)",
    "SFTStageConfig.rows": "training rows (prompt, completion) the task makes for SFT",
    "SFTStageConfig.max_steps": "optimizer steps of the stage",
    "SFTStageConfig.batch_size": "rows per optimizer step, over all processes and gradient-accumulation steps",
    "SFTStageConfig.warmup_ratio": "fraction of max_steps spent warming the learning rate up",
    "SFTStageConfig.batching": "how rows are drawn into batches: random, length_grouped or rebalanced (sft.BATCHING)",
    "SFTStageConfig.probe_problems": "held-out problems the teacher probe grades (with probe_every > 0)",
    "SFTStageConfig.probe_k": "teacher probe: samples per problem",
    "SFTStageConfig.probe_temperature": "teacher probe: sampling temperature (0: greedy)",
    "RLVRStageConfig.max_steps": "optimizer steps of the stage",
    "RLVRStageConfig.max_rollout_tokens": "rollout-token budget: training ends after the optimizer step at which the "
                                          "response tokens generated (every round, over all processes) reach it; "
                                          "null: max_steps alone",
    "RLVRStageConfig.prompts_per_step": "prompts per optimizer step, over all processes and gradient-accumulation "
                                        "steps",
    "RLVRStageConfig.group_size": "rollouts per prompt; advantages are centred within each prompt's group",
    "RLVRStageConfig.format_reward_weight": "weight of the format reward beside the verifier reward (0: none)",
    "RLVRStageConfig.loss_type": "the GRPO-family loss: grpo, dapo, dr_grpo, bnpo or cispo (TRL's loss_type)",
    "RLVRStageConfig.scale_rewards": "advantages divided by the reward std of the group, the batch, or none",
    "RLVRStageConfig.dynamic_sampling": "DAPO dynamic sampling: drop groups whose rollouts all get the same "
                                        "advantage and refill the batch with fresh prompts",
    "RLVRStageConfig.dynamic_sampling_max_rounds": "generation rounds dynamic sampling may take per step",
    "RLVRStageConfig.train_problems": "training problems drawn from the task",
    "OPSDStageConfig.method": "the arm's compaction method: opsd, crisp, contrastive, length_rl or budget "
                              "(methods.METHODS); a method sets defaults that the arm's own keys override",
    "OPSDStageConfig.teacher_refresh_steps": "periodic teacher: optimizer steps between copies of the student "
                                             "into the teacher",
    "OPSDStageConfig.contrast_variant": "contrastive: which negative and which target (contrastive.VARIANTS): "
                                        "unrelated_solution (contrast_context, full vocabulary) or rlcsd_plugin "
                                        "(an incorrect sibling rollout, the RLCSD authors' OPSD plug-in; it sets "
                                        "teacher_context sibling, gate all, forward_kl, clip_tau 0.05)",
    "OPSDStageConfig.contrast_context": "contrastive unrelated_solution: the teacher prompt whose signal is "
                                        "subtracted (no privileged information)",
    "OPSDStageConfig.contrast_weight": "contrastive: the weight w of the contrast (0: plain OPSD with the reference "
                                       "anchor)",
    "OPSDStageConfig.contrast_anchor": "contrastive: what the contrast tilts: reference (as the RLCSD authors' "
                                       "plug-in) or student",
    "OPSDStageConfig.contrast_floor": "contrastive: lower bound of the negative teacher's log-probabilities; "
                                      "null: none",
    "OPSDStageConfig.contrast_top_k": "contrastive rlcsd_plugin: the support, the reference teacher's top k tokens "
                                      "plus one tail bucket",
    "OPSDStageConfig.contrast_token_tau": "contrastive rlcsd_plugin: each token's loss is multiplied by "
                                          "KL(p_c || p_w) / (KL + tau) on the support; null: by 1",
    "OPSDStageConfig.length_reward": "length_rl: the length-aware reward (rewards.LENGTH_REWARDS)",
    "OPSDStageConfig.length_target": "length_rl: the target length in tokens; null: the quantile below of the "
                                     "starting checkpoint's rollout lengths",
    "OPSDStageConfig.length_target_quantile": "length_rl: which quantile of the starting lengths is the target",
    "OPSDStageConfig.budgets": "budget: the token budgets evaluated; empty: budget_quantiles of the starting "
                               "checkpoint's lengths on training problems",
    "OPSDStageConfig.budget_quantiles": "budget: the quantiles of the starting checkpoint's lengths on 64 training "
                                        "problems (sampled as the evaluation samples) used as budgets",
    "OPSDStageConfig.budget_answer_tokens": "budget: tokens the model may write after the forced end of thinking",
    "EvalSection.budgets": "the budgets of each summary's accuracy_at_budget; empty: a ladder from the lengths",
    "OPSDStageConfig.gate": "which rollouts are trained on, by outcome: all, correct, incorrect, "
                            "correct_or_truncated or split (gates.GATES)",
    "OPSDStageConfig.divergence": "the per-token divergence between student and teacher (divergences.DIVERGENCES)",
    "OPSDStageConfig.jsd_beta": "the jsd divergence's mixture weight, in (0, 1); 0.5 is the symmetric JSD",
    "OPSDStageConfig.clip_tau": "clip each vocabulary entry's contribution to the divergence at this value "
                                "(divergences.DivergenceOptions); null: no clip",
    "OPSDStageConfig.top_k": "compare the distributions on the teacher's k most probable tokens only; null: the "
                             "full vocabulary",
    "OPSDStageConfig.teacher_weights": "the teacher's weights: frozen (the stage's start), ema (an average of the "
                                       "student), live (the student itself) or periodic (re-copied every "
                                       "teacher_refresh_steps)",
    "OPSDStageConfig.ema_rate": "ema teacher: teacher <- (1 - rate) * teacher + rate * student after each step",
    "OPSDStageConfig.teacher_context": "the privileged block in the teacher's prompt (prompts.TEACHER_CONTEXTS)",
    "OPSDStageConfig.max_steps": "optimizer steps of each OPSD arm (the upper bound under max_rollout_tokens)",
    "OPSDStageConfig.max_rollout_tokens": "rollout-token budget of each arm: training ends after the optimizer step at "
                                          "which the response tokens generated (refills and gated-out rollouts "
                                          "included, over all processes) reach it; null: max_steps alone",
    "OPSDStageConfig.prompts_per_step": "prompts per optimizer step, over all processes and gradient-accumulation "
                                        "steps",
    "OPSDStageConfig.rollouts_per_prompt": "student rollouts per prompt",
    "OPSDStageConfig.chunk_size": "response tokens scored per chunk when the divergence is computed (memory)",
    "OPSDStageConfig.lora_alpha": "LoRA alpha (with lora_r > 0)",
    "OPSDStageConfig.lora_target_modules": "modules that get LoRA adapters (with lora_r > 0)",
    "OPSDStageConfig.train_problems": "training problems drawn from the task",
    "OPSDStageConfig.refill_max_rounds": "generation rounds a step may take to keep min_kept_rollouts rollouts",
}


# Fields a stage passes to its TRL config unchanged under the same name: stage config -> (TRL config
# class, fields). `config show` gives such a field with no comment or `MEANINGS` entry the first
# sentence of TRL's help for it (`TRL_HELP`), kept here so that showing a config does not import TRL;
# a test compares it with the help of the TRL installed.
_COMMON = ("gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "gradient_checkpointing", "save_steps",
           "logging_steps", "report_to")
TRL_FIELDS = {
    "SFTStageConfig": ("SFTConfig", (*_COMMON, "weight_decay", "max_length")),
    "RLVRStageConfig": ("GRPOConfig", (*_COMMON, "warmup_steps", "loss_type", "scale_rewards", "epsilon",
                                       "epsilon_high", "beta", "mask_truncated_completions", "max_completion_length",
                                       "temperature", "top_p", "num_iterations", *VLLM_FIELDS)),
    "OPSDStageConfig": ("GRPOConfig", (*_COMMON, "max_completion_length", "temperature", *VLLM_FIELDS)),
}
TRL_HELP = {
    "SFTConfig": {
        "gradient_accumulation_steps": "Number of update steps to accumulate gradients before performing a "
                                       "backward/update pass.",
        "learning_rate": "The initial learning rate for AdamW.",
        "lr_scheduler_type": "The learning rate scheduler type to use.",
        "gradient_checkpointing": "Enable gradient checkpointing to trade compute for memory.",
        "save_steps": "Save checkpoint every X updates steps.",
        "logging_steps": "Log every X updates steps.",
        "report_to": "The list of integrations to report the results and logs to.",
        "weight_decay": "Weight decay coefficient applied by the optimizer.",
        "max_length": "Maximum length of the tokenized sequence.",
    },
    "GRPOConfig": {
        "gradient_accumulation_steps": "Number of update steps to accumulate gradients before performing a "
                                       "backward/update pass.",
        "learning_rate": "The initial learning rate for AdamW.",
        "lr_scheduler_type": "The learning rate scheduler type to use.",
        "gradient_checkpointing": "Enable gradient checkpointing to trade compute for memory.",
        "save_steps": "Save checkpoint every X updates steps.",
        "logging_steps": "Log every X updates steps.",
        "report_to": "The list of integrations to report the results and logs to.",
        "warmup_steps": "Number of steps for a linear warmup from 0 to `learning_rate`.",
        "loss_type": "Specifies the loss formulation to use.",
        "scale_rewards": "Specifies the scaling strategy for rewards.",
        "epsilon": "Epsilon value for clipping.",
        "epsilon_high": "Upper-bound epsilon value for clipping.",
        "beta": "KL coefficient.",
        "mask_truncated_completions": "When enabled, truncated completions are excluded from the loss calculation, "
                                      "preventing them from being incorrectly penalized and introducing noise during "
                                      "training.",
        "max_completion_length": "Maximum length of the generated completion.",
        "temperature": "Temperature for sampling.",
        "top_p": "Float that controls the cumulative probability of the top tokens to consider.",
        "num_iterations": "Number of iterations per batch (denoted as μ in the algorithm).",
        "use_vllm": "Whether to use vLLM for generating completions.",
        "vllm_mode": "Mode to use for vLLM integration when `use_vllm` is set to `True`.",
        "vllm_gpu_memory_utilization": "Control the GPU memory utilization for vLLM.",
        "vllm_tensor_parallel_size": "Control the tensor parallel size for vLLM.",
        "vllm_max_model_length": "Context window for vLLM.",
        "vllm_enable_sleep_mode": "Enable vLLM sleep mode to offload weights/cache during the optimizer step.",
        "vllm_server_base_url": "Base URL for the vLLM server (e.g., 'http://localhost:8000').",
    },
}


def field_meaning(cls, name: str) -> str | None:
    """What field `name` of config dataclass `cls` means: its source comment, else `MEANINGS`, else (for
    a field passed through to TRL unchanged) the first sentence of TRL's help for it; None if none."""
    comment = field_comments(cls).get(name)
    if comment:
        return comment
    for klass in cls.__mro__:
        if f"{klass.__name__}.{name}" in MEANINGS:
            return MEANINGS[f"{klass.__name__}.{name}"]
    trl_class, passed = TRL_FIELDS.get(cls.__name__, (None, ()))
    return TRL_HELP[trl_class].get(name) if name in passed else None


def describe_config(config: PipelineConfig) -> list[KeyInfo]:
    """Every key of `config`, dotted, in declaration order, with nested sections expanded (the task's
    options are listed as the task's own option fields)."""
    return _describe(config, PipelineConfig(), "")


def _describe(section, default, prefix: str) -> list[KeyInfo]:
    infos = []
    for f in dataclasses.fields(section):
        key, value, base = f"{prefix}{f.name}", getattr(section, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            infos += _describe(value, base if type(base) is type(value) else type(value)(), f"{key}.")
        elif isinstance(section, TaskSection) and f.name == "options":
            infos += _task_options(section, key)
        else:
            if f.name == "arms":
                value, base = ([{"name": a.name, **a.overrides} for a in arms] for arms in (value, base))
            infos.append(KeyInfo(key, value, base, field_meaning(type(section), f.name)))
    return infos


def _task_options(task: TaskSection, key: str) -> list[KeyInfo]:
    spec = OPTIONS[task.name]
    return [KeyInfo(f"{key}.{f.name}", task.options.get(f.name, f.default), f.default, field_meaning(spec, f.name))
            for f in dataclasses.fields(spec)]


def _yaml_text(value) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text


def format_keys(infos: list[KeyInfo]) -> list[str]:
    """One line per key: `* key: value  (default: D)  # meaning`; `*` marks a value that is not the default."""
    lefts = [f"{'*' if info.changed else ' '} {info.key}: {_yaml_text(info.value)}"
             + (f"  (default: {_yaml_text(info.default)})" if info.changed else "") for info in infos]
    width = min(max(map(len, lefts), default=0), 64)
    return [f"{left:<{width}}  # {info.meaning}" if info.meaning else left for left, info in zip(lefts, infos)]
