"""The settings of the training stages: SFT, RLVR and OPSD, with the held-out checks and rollout generation they share.

Each stage config checks its values when it is built, before any model loads: named choices against
the names in `choices`, numbers against `ranges.RANGES`, and what TRL would refuse only once the stage
runs. The stages themselves (`stages.sft`, `stages.rlvr`, `stages.opsd`) turn these settings into TRL's
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from opsdlab.config.choices import (ANCHORS, BATCHING, CONTEXT_READS, DIVERGENCES, GATES, GENERATION_BACKENDS,
                                    LOSS_TYPES, POSITION_WEIGHTINGS, REWARD_SCALINGS, SELECT_RULES, STOP_RULES,
                                    STOP_SHORTHANDS, TEACHER_WEIGHTS, VLLM_MODES)
from opsdlab.config.divergence import DivergenceOptions
from opsdlab.config.methods import CONTRAST_VARIANTS
from opsdlab.config.ranges import check_ranges, per_device_rows, rollouts_per_device


@dataclass(frozen=True)
class CheckSettings:
    """Held-out checks, stopping and checkpoint selection: fields shared by the RLVR and OPSD stage configs."""

    check_every: int = 0  # grade held-out problems before the first step and every N steps (0: no checks)
    check_problems: int = 32  # held-out problems per check (the first ones of those the stage is given)
    check_k: int = 2  # samples per problem at a check (avg@k)
    check_temperature: float = 0.6  # sampling temperature of a check (0: greedy, then check_k must be 1)
    check_max_new_tokens: int | None = None  # response cap of a check; null: the stage's max_completion_length
    # when a check ends training (checks.STOP_RULES): none, accuracy_drop, length_plateau, length_inflation,
    # truncation, repetition, a list of them (any one stops) or collapse (accuracy_drop and the three collapse rules)
    stop: tuple | str = "none"
    stop_tolerance: float = 0.05  # accuracy_drop: the absolute avg@k drop below the start that stops training
    # The collapse signs (null: not a sign). A check past one is never selected, whatever `stop` is.
    stop_length_ratio: float | None = 1.5  # length_inflation sign: mean tokens above this times the start's (null: off)
    stop_truncation: float | None = 0.2  # truncation sign: truncated share over the start's by more (null: off)
    stop_repetition: float | None = 0.2  # repetition sign: looping share over the start's by more than this (null: off)
    select: str = "last"  # which check's weights the stage saves: last, shortest_within_tolerance or best_aes
    select_tolerance: float = 0.02  # shortest_within_tolerance: absolute avg@k a pick may lose against the start
    keep_checkpoints: int = 3  # checked checkpoints kept besides the newest and the selected one


def stop_names(stop: tuple | str) -> tuple[str, ...]:
    """The stopping rules a `stop` value names: one name, a list, or a comma-separated string of them,
    with shorthands (`STOP_SHORTHANDS`) expanded and repeats dropped, in the order given."""
    names = [n.strip() for n in stop.split(",")] if isinstance(stop, str) else [str(n) for n in stop]
    return tuple(dict.fromkeys(m for n in names for m in STOP_SHORTHANDS.get(n, (n,))))


def check_settings(stage: str, config: CheckSettings) -> None:
    """Validate the `CheckSettings` fields of a stage config; errors name the stage's key."""
    if config.check_every < 0:
        raise ValueError(f"{stage}: check_every must be >= 0 (0: no checks), got {config.check_every}")
    if config.check_problems < 1 or config.check_k < 1:
        raise ValueError(f"{stage}: check_problems and check_k must be >= 1, got {config.check_problems} and "
                         f"{config.check_k}")
    if config.check_temperature < 0:
        raise ValueError(f"{stage}: check_temperature must be >= 0, got {config.check_temperature}")
    if config.check_temperature == 0 and config.check_k != 1:
        raise ValueError(f"{stage}: check_temperature 0 is greedy, whose samples are identical; set check_k=1")
    if config.check_max_new_tokens is not None and config.check_max_new_tokens < 1:
        raise ValueError(f"{stage}: check_max_new_tokens must be >= 1 or null, got {config.check_max_new_tokens}")
    stops = stop_names(config.stop)
    if not stops:
        raise ValueError(f"{stage}: stop names no rule; give none or one of {sorted(STOP_RULES)}")
    for name in stops:
        if name not in STOP_RULES:
            raise ValueError(f"{stage}: stop must be one of {sorted(STOP_RULES)}, a list of them or "
                             f"{' or '.join(STOP_SHORTHANDS)}, got {name!r}")
    if config.select not in SELECT_RULES:
        raise ValueError(f"{stage}: select must be one of {sorted(SELECT_RULES)}, got {config.select!r}")
    for name in ("stop_tolerance", "select_tolerance"):
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"{stage}: {name} is an absolute accuracy, in [0, 1]; got {getattr(config, name)}")
    if config.keep_checkpoints < 0:
        raise ValueError(f"{stage}: keep_checkpoints must be >= 0, got {config.keep_checkpoints}")
    if config.check_every == 0:
        stopping = ",".join(n for n in stops if n != "none") or "none"
        for name, value, off in (("stop", stopping, "none"), ("select", config.select, "last")):
            if value != off:
                raise ValueError(f"{stage}: {name}: {value} reads held-out checks; set check_every > 0 "
                                 f"(or {name}: {off})")


@dataclass(frozen=True)
class VLLMGeneration:
    """How rollouts are generated, shared by the RLVR and OPSD stage configs (`VLLM_FIELDS`).

    `generation_backend` names the generator (`GENERATION_BACKENDS`); `use_vllm: true`, the older
    switch, still means "vllm". With vLLM, "colocate" builds an engine in each training process,
    "server" asks a running `trl vllm-serve` (`vllm_server_base_url`). The other fields are
    GRPOConfig's, passed through; `grpo_args` maps the backend onto GRPOConfig's switches.
    """

    # how rollouts are generated: transformers (model.generate), paged (transformers continuous batching) or vllm
    generation_backend: str = "transformers"
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_length: int | None = None
    vllm_enable_sleep_mode: bool = False
    vllm_server_base_url: str | None = None


VLLM_FIELDS = tuple(f.name for f in fields(VLLMGeneration))


def check_vllm_fields(stage: str, config) -> None:
    """The generation fields of a stage config (RLVR or OPSD), checked before TRL sees them."""
    if config.generation_backend not in GENERATION_BACKENDS:
        raise ValueError(f"{stage}: generation_backend must be one of {GENERATION_BACKENDS}, "
                         f"got {config.generation_backend!r}")
    if config.use_vllm and config.generation_backend not in ("transformers", "vllm"):
        raise ValueError(f"{stage}: use_vllm asks for vLLM but generation_backend is {config.generation_backend!r}; "
                         f"set one of them (generation_backend=vllm replaces use_vllm=true)")
    if config.vllm_mode not in VLLM_MODES:
        raise ValueError(f"{stage}: vllm_mode must be one of {VLLM_MODES}, got {config.vllm_mode!r}")
    if not 0 < config.vllm_gpu_memory_utilization <= 1:
        raise ValueError(f"{stage}: vllm_gpu_memory_utilization must be in (0, 1], "
                         f"got {config.vllm_gpu_memory_utilization}")
    if config.vllm_tensor_parallel_size < 1:
        raise ValueError(f"{stage}: vllm_tensor_parallel_size must be >= 1, got {config.vllm_tensor_parallel_size}")


@dataclass(frozen=True)
class SFTStageConfig:
    """SFT settings. `batch_size` counts rows per optimizer step over all processes and
    gradient-accumulation steps; the per-device micro-batch is batch_size / (num_processes x
    gradient_accumulation_steps), which must divide evenly."""

    rows: int = 8000
    max_steps: int = 800
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_length: int = 512
    save_steps: int = 100
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    report_to: str = "none"
    batching: str = "random"
    # Every `probe_every` steps (0: never) the pipeline grades answers to `probe_problems` held-out
    # problems from the student prompt and from the OPSD teacher's prompt (`TeacherProbe`): when,
    # during SFT, the model learns to use the privileged context. Greedy by default; `probe_k`
    # samples at `probe_temperature` show what greedy hides once the student's greedy answers are
    # good (a reading teacher stays accurate under sampling, a student does not).
    probe_every: int = 0
    probe_problems: int = 100
    probe_k: int = 1
    probe_temperature: float = 0.0

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ValueError(f"sft: batching must be one of {sorted(BATCHING)}, got {self.batching!r}")
        if min(self.rows, self.max_steps, self.batch_size, self.gradient_accumulation_steps) < 1:
            raise ValueError("sft: rows, max_steps, batch_size and gradient_accumulation_steps must be >= 1")
        if self.probe_every < 0 or self.probe_problems < 1 or self.probe_k < 1 or self.probe_temperature < 0:
            raise ValueError(f"sft: need probe_every >= 0, probe_problems >= 1, probe_k >= 1 and "
                             f"probe_temperature >= 0, got {self.probe_every}, {self.probe_problems}, "
                             f"{self.probe_k} and {self.probe_temperature}")
        check_ranges("sft", self)

    def per_device_batch(self, num_processes: int) -> int:
        """Rows per device per micro-batch on `num_processes` processes (an error if uneven)."""
        return per_device_rows("sft", self.batch_size, f"batch_size ({self.batch_size})", num_processes,
                               self.gradient_accumulation_steps)


@dataclass(frozen=True)
class RLVRStageConfig(VLLMGeneration, CheckSettings):
    """GRPO-family RL settings; `CheckSettings` adds held-out checks, stopping and checkpoint selection.

    Batch: `prompts_per_step` prompts, each with `group_size` rollouts, make one optimizer step,
    summed over all processes and gradient-accumulation steps (the paper's "32 prompts per step").
    Each process generates prompts_per_step / num_processes whole groups, and the per-device
    micro-batch is prompts_per_step x group_size / (num_processes x gradient_accumulation_steps)
    rollouts (`grpo_args`); both must divide evenly.
    """

    stop_length_ratio: float | None = None  # length_inflation sign as in OPSD; null (off) here: RL may lengthen on purpose
    max_steps: int = 50
    max_rollout_tokens: int | None = None
    prompts_per_step: int = 8
    group_size: int = 8
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    beta: float = 0.0
    mask_truncated_completions: bool = False
    learning_rate: float = 4e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    max_completion_length: int = 192
    temperature: float = 1.0
    top_p: float = 1.0
    format_reward_weight: float = 0.0
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    save_steps: int = 25
    logging_steps: int = 5
    report_to: str = "none"
    train_problems: int = 4000

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"rlvr: loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in REWARD_SCALINGS:
            raise ValueError(f"rlvr: scale_rewards must be one of {REWARD_SCALINGS}, got {self.scale_rewards!r}")
        if self.group_size < 2:
            raise ValueError(f"rlvr: group_size must be >= 2 (group-centred advantages), got {self.group_size}")
        if min(self.prompts_per_step, self.max_steps, self.gradient_accumulation_steps) < 1:
            raise ValueError("rlvr: prompts_per_step, max_steps and gradient_accumulation_steps must be >= 1")
        if self.dynamic_sampling_max_rounds < 1:
            raise ValueError("rlvr: dynamic_sampling_max_rounds must be >= 1")
        check_ranges("rlvr", self)
        check_vllm_fields("rlvr", self)
        check_settings("rlvr", self)

    def per_device_batch(self, num_processes: int) -> int:
        """Rollouts per device per micro-batch on `num_processes` processes (an error if uneven)."""
        return rollouts_per_device("rlvr", self.prompts_per_step, self.group_size, num_processes,
                                   self.gradient_accumulation_steps)


def check_supervision(config) -> None:
    """Refuse supervision settings that would silently do nothing: a `supervised_tokens` that covers every
    token a rollout can have, and a `margin_cut` window longer than the tokens it may cut."""
    cap = config.max_completion_length
    if config.supervised_tokens is not None and config.supervised_tokens >= cap:
        raise ValueError(f"opsd: supervised_tokens ({config.supervised_tokens}) >= max_completion_length ({cap}) "
                         "supervises every token; set it below max_completion_length, or null")
    span = cap if config.supervised_tokens is None else config.supervised_tokens
    if config.position_weighting == "margin_cut" and config.margin_window > span:
        raise ValueError(f"opsd: margin_window ({config.margin_window}) exceeds the {span} supervised tokens of a "
                         "rollout, so margin_cut never cuts; make it smaller")


@dataclass(frozen=True)
class OPSDStageConfig(VLLMGeneration, CheckSettings):
    """OPSD settings; `CheckSettings` adds held-out checks, stopping and checkpoint selection.

    Batch: `prompts_per_step` distinct prompts, each with `rollouts_per_prompt` rollouts, make one
    optimizer step, summed over all processes and gradient-accumulation steps (the paper's "32
    prompts per step"); the per-device micro-batch is prompts_per_step x rollouts_per_prompt /
    (num_processes x gradient_accumulation_steps) rollouts, and each process takes
    prompts_per_step / num_processes prompts; both must divide evenly (`opsd_args`).
    `rollouts_per_prompt: 1` is the paper's setting: OPSD has no group advantage, so no group is
    needed; the `sibling` teacher context then always falls back to the reference solution.
    """

    # The compaction method of an arm (`methods.METHODS`): "opsd", "crisp", "contrastive", "length_rl"
    # or "budget"; a method may set other defaults of this section (crisp: concise teacher, all rollouts).
    method: str = "opsd"
    gate: str = "correct"
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    clip_tau: float | None = None
    top_k: int | None = None
    teacher_weights: str = "frozen"
    ema_rate: float = 0.05
    teacher_refresh_steps: int = 50  # teacher_weights "periodic": the teacher is re-copied from the student this often
    # only the first N response tokens of each rollout carry the loss (null: every token; loss.positions)
    supervised_tokens: int | None = None
    # each supervised token's weight by position: none (1), linear (1 down to position_floor) or margin_cut
    position_weighting: str = "none"
    position_floor: float = 0.0  # linear: the weight of a rollout's last supervised token (its first has 1)
    # margin_cut: weight 0 from the first token where the trailing mean of the teacher-minus-student log-prob
    # of the sampled token falls below this
    margin_threshold: float = 0.0
    margin_window: int = 8  # margin_cut: response tokens in the trailing mean of the margin (1: no smoothing)
    # > 0: each supervised token's loss adds anchor_beta x KL(student || the stage's starting model reading the
    # student's prompt), a guard against collapse
    anchor_beta: float = 0.0
    # method "contrastive" (`contrastive`): the target contrasts the teacher under `teacher_context` with
    # the same teacher under a negative context; `contrast_variant` (`contrastive.VARIANTS`) says which:
    # "unrelated_solution" (`contrast_context`, full vocabulary) or "rlcsd_plugin" (an incorrect sibling
    # rollout, the support and token weights of the RLCSD authors' OPSD plug-in; it sets its own defaults).
    contrast_variant: str = "unrelated_solution"
    contrast_context: str = "unrelated"  # unrelated_solution: the negative context (no privileged information)
    contrast_weight: float = 0.5
    contrast_anchor: str = "reference"  # or "student": the target is the student tilted by the contrast
    contrast_floor: float | None = -5.0  # lower bound of the negative teacher's log-probabilities; null: none
    contrast_top_k: int = 100  # rlcsd_plugin: the support, the reference teacher's top k tokens plus a tail bucket
    contrast_token_tau: float | None = 1.0  # rlcsd_plugin: token loss x KL(p_c || p_w) / (KL + tau); null: x 1
    # method "length_rl": RLVR continued with a length-aware reward (`rewards.LENGTH_REWARDS`); the
    # target length is given, or the length_target_quantile of the starting checkpoint's rollout lengths.
    length_reward: str = "truncation"
    length_target: int | None = None
    length_target_quantile: float = 0.5
    # method "budget": no training; the starting checkpoint evaluated with its response cut at each
    # budget and the answer forced. Budgets in tokens, or quantiles of its sampled lengths on training
    # problems (never on the problems it is scored on).
    budgets: tuple = ()
    budget_quantiles: tuple = (0.25, 0.5, 0.75)
    budget_answer_tokens: int = 32
    teacher_context: str = "solution"
    teacher_thinking: bool | None = None  # None: same as the student (the run's thinking setting)
    max_steps: int = 20
    max_rollout_tokens: int | None = None
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 4
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "constant"
    max_completion_length: int = 192
    temperature: float = 1.0
    chunk_size: int = 1024
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    save_steps: int = 10
    logging_steps: int = 5
    report_to: str = "none"
    token_stats_rows: int = 8  # rollouts per step whose per-token teacher/student numbers are kept
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (the frozen teacher is then the base, adapters off)
    lora_alpha: int = 128
    lora_target_modules: str = "all-linear"
    train_problems: int = 4000
    # A step whose gate keeps fewer rollouts (over all processes) is refilled with fresh prompts, up
    # to refill_max_rounds generation rounds; a step that still keeps nothing skips its optimizer step.
    min_kept_rollouts: int = 1
    refill_max_rounds: int = 4

    def __post_init__(self):
        for name, value, valid in (("gate", self.gate, GATES), ("divergence", self.divergence, DIVERGENCES),
                                   ("teacher_weights", self.teacher_weights, TEACHER_WEIGHTS),
                                   ("teacher_context", self.teacher_context, CONTEXT_READS),
                                   ("position_weighting", self.position_weighting, POSITION_WEIGHTINGS)):
            if value not in valid:
                raise ValueError(f"opsd: {name} must be one of {sorted(valid)}, got {value!r}")
        if self.contrast_context not in CONTEXT_READS:
            raise ValueError(f"opsd: contrast_context must be one of {sorted(CONTEXT_READS)}, "
                             f"got {self.contrast_context!r}")
        if self.contrast_anchor not in ANCHORS:
            raise ValueError(f"opsd: contrast_anchor must be one of {list(ANCHORS)}, got {self.contrast_anchor!r}")
        if self.contrast_weight < 0:
            raise ValueError(f"opsd: contrast_weight must be >= 0, got {self.contrast_weight}")
        if self.contrast_variant not in CONTRAST_VARIANTS:
            raise ValueError(f"opsd: contrast_variant must be one of {sorted(CONTRAST_VARIANTS)}, "
                             f"got {self.contrast_variant!r}")
        if self.contrast_top_k < 1:
            raise ValueError(f"opsd: contrast_top_k must be >= 1, got {self.contrast_top_k}")
        if self.contrast_token_tau is not None and not 0 < self.contrast_token_tau < float("inf"):
            raise ValueError(f"opsd: contrast_token_tau must be a number > 0 or null, got {self.contrast_token_tau}")
        if self.teacher_refresh_steps < 1:
            raise ValueError(f"opsd: teacher_refresh_steps must be >= 1, got {self.teacher_refresh_steps}")
        if self.length_target is not None and self.length_target < 1:
            raise ValueError(f"opsd: length_target must be a positive number of tokens or null, got {self.length_target}")
        if not 0 < self.length_target_quantile <= 1:
            raise ValueError(f"opsd: length_target_quantile must be in (0, 1], got {self.length_target_quantile}")
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.budgets):
            raise ValueError(f"opsd: budgets must be positive token counts, got {list(self.budgets)}")
        if not self.budgets and (not self.budget_quantiles or any(not 0 < q <= 1 for q in self.budget_quantiles)):
            raise ValueError(f"opsd: budget_quantiles must be in (0, 1], got {list(self.budget_quantiles)}")
        if self.budget_answer_tokens < 1:
            raise ValueError(f"opsd: budget_answer_tokens must be >= 1, got {self.budget_answer_tokens}")
        if self.rollouts_per_prompt < 1:
            raise ValueError(f"opsd: rollouts_per_prompt must be >= 1, got {self.rollouts_per_prompt}")
        if self.rollouts_per_prompt == 1 and self.prompts_per_step < 2:
            raise ValueError("opsd: one rollout per prompt needs prompts_per_step >= 2 (TRL validates its "
                             "generation batch against a group of at least 2)")
        if self.lora_r < 0:
            raise ValueError(f"opsd: lora_r must be >= 0, got {self.lora_r}")
        if self.min_kept_rollouts < 0 or self.refill_max_rounds < 1:
            raise ValueError("opsd: min_kept_rollouts must be >= 0 and refill_max_rounds >= 1")
        if min(self.chunk_size, self.max_steps, self.prompts_per_step, self.gradient_accumulation_steps) < 1:
            raise ValueError("opsd: chunk_size, max_steps, prompts_per_step and gradient_accumulation_steps "
                             "must be >= 1")
        check_ranges("opsd", self)  # learning rate, temperature (both sides' logits are divided by it) ...
        check_supervision(self)
        DivergenceOptions(beta=self.jsd_beta, clip_tau=self.clip_tau, top_k=self.top_k)  # checks their ranges
        check_vllm_fields("opsd", self)
        check_settings("opsd", self)

    def per_device_batch(self, num_processes: int) -> int:
        """Rollouts per device per micro-batch on `num_processes` processes (an error if uneven)."""
        return rollouts_per_device("opsd", self.prompts_per_step, self.rollouts_per_prompt, num_processes,
                                   self.gradient_accumulation_steps)

    def as_rlvr(self) -> RLVRStageConfig:
        """The generation/optimizer settings expressed for TRL's GRPOConfig builder.

        Not the rollouts per prompt, which may be 1 here but not in RLVR: `opsd_args` passes them.
        """
        return RLVRStageConfig(
            max_steps=self.max_steps, prompts_per_step=self.prompts_per_step,
            learning_rate=self.learning_rate, lr_scheduler_type=self.lr_scheduler_type,
            max_completion_length=self.max_completion_length, temperature=self.temperature,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            gradient_checkpointing=self.gradient_checkpointing, **{name: getattr(self, name) for name in VLLM_FIELDS},
            save_steps=self.save_steps, logging_steps=self.logging_steps, report_to=self.report_to,
        )
