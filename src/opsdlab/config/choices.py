"""The named choices a config accepts whose implementations live in higher layers.

Validation needs the names, not the code behind them: keeping them here lets a config be checked
without importing torch, transformers or TRL. Where a registry is plain data (a teacher context's
field, a method's defaults), this layer holds the data itself and the higher layer reads it from
here; where a registry maps names to code (a gate, a divergence), this layer holds the names and a
test checks they are the registry's keys.
"""

from __future__ import annotations

STAGES = ("sft", "rlvr", "opsd")

# The weights' dtype when a model is loaded (`modeling.models.load_model`).
DTYPES = ("float32", "bfloat16", "float16")
# The offline model's sizes: keys of `modeling.models.TINY_SIZES`.
TINY_SIZES = ("tiny", "micro", "shallow", "small")
# What samples an evaluation's responses: keys of `evaluation.evaluate.BACKENDS`.
BACKENDS = ("transformers", "vllm")

# OPSD: which rollouts are trained on (`loss.gates.GATES`), the per-token divergence
# (`loss.divergences.DIVERGENCES`) and the teacher's weights (`stages.teacher.TEACHER_WEIGHTS`).
GATES = ("all", "correct", "incorrect", "correct_or_truncated", "split")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled_reverse_kl")
TEACHER_WEIGHTS = ("frozen", "ema", "periodic", "live")
# How much each supervised response token's loss counts, by its position (`loss.positions.POSITION_WEIGHTINGS`).
POSITION_WEIGHTINGS = ("none", "linear", "margin_cut")
# What the contrastive target tilts (`loss.contrastive`): the reference teacher's signal or the student's.
ANCHORS = ("student", "reference")
# The length-aware rewards of the `length_rl` method (`loss.rewards.LENGTH_REWARDS`).
LENGTH_REWARDS = ("truncation",)

# The teacher contexts (`tasks.prompts.TEACHER_CONTEXTS`, which renders each) and what each one's block
# reads of a problem besides its text: the `Example` field that every problem it is rendered for must
# have, or None. `unrelated` shows another problem's solution, so every problem needs one; `sibling`
# falls back to the problem's own solution when its group has no correct rollout (always, with one
# rollout per prompt). RL data of problems and answers alone therefore serves `answer`, `concise` and
# `none`; every problem has an answer.
CONTEXT_READS: dict[str, str | None] = {"solution": "solution", "answer": "answer", "sibling": "solution",
                                        "unrelated": "solution", "concise": None, "none": None}

# Held-out checks during RLVR and OPSD: when a check ends training (`stages.checks.STOP_RULES`) and
# which check's weights a stage hands on (`stages.checks.SELECT_RULES`).
# `stop` takes one name or a list (any rule that fires stops); a shorthand stands for its list.
STOP_RULES = ("none", "accuracy_drop", "length_plateau", "length_inflation", "truncation", "repetition")
STOP_SHORTHANDS = {"collapse": ("accuracy_drop", "length_inflation", "truncation", "repetition")}
SELECT_RULES = ("last", "shortest_within_tolerance", "best_aes")

# How SFT rows are drawn into batches: named choice -> the Trainer's `train_sampling_strategy`.
# `random`: each micro-batch is rows drawn at random, padded to its longest row.
# `length_grouped` puts rows of similar length together (less padding, cheaper steps on a CPU;
# benchmarks/sft_step_time.py) at the cost of batches that are less random: where length tells the
# kind of row apart (the tiny task's privileged rows are the long ones) it trains a much worse model.
# `rebalanced` (transformers' BatchRebalanceSampler) keeps each optimizer step a random draw of
# `batch_size` rows and splits only that step's rows by length into its gradient-accumulation
# micro-batches; the loss is normalised over the whole step, so the step's gradient is the one of its
# rows in a single batch, with less padding. It needs gradient_accumulation_steps > 1 (or several
# processes) to split anything. Its shuffle is transformers' own (seed 42 + epoch), over rows drawn
# from the run's seed.
BATCHING = {"random": "random", "length_grouped": "group_by_length", "rebalanced": "batch_rebalance"}

# TRL's GRPO-family losses and reward scalings (GRPOConfig's loss_type and scale_rewards).
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo")
REWARD_SCALINGS = ("group", "batch", "none")
VLLM_MODES = ("colocate", "server")
# How TRL's trainer generates rollouts: `model.generate` on padded batches, transformers' continuous
# batching over a paged KV cache (`generate_batch`), or vLLM.
GENERATION_BACKENDS = ("transformers", "paged", "vllm")
