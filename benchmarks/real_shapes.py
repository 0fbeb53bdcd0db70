"""Will it fit: the peak live tensor bytes of every stage's step at Qwen3-1.7B's and Qwen3-8B's real
shapes, measured on a CPU, against `opsdlab plan`'s prediction (`config.memory`).

    python benchmarks/real_shapes.py --json benchmarks/results/real_shapes.json [--quick | --full]

The bytes of the tensors alive at the peak of a step do not depend on the device (kernel workspaces
aside), so they are measured here exactly: `LiveBytes` counts every tensor storage an operator
creates until it is freed. Steps run with real tensors where this CPU can compute them (one layer,
short completions) and with PyTorch's fake tensors (`FakeTensorMode`: every allocation at full size,
no arithmetic) everywhere else, up to the full depth and 32k-token completions; both go through the
same code, and the real and fake traces of one configuration agree to the byte (`real_vs_fake`).

What a step runs is the project's own code: GRPO is `RLVRTrainer._compute_loss` (TRL's fused,
tiled log-probability head), OPSD is `OPSDTrainer._compute_loss` with the frozen or EMA teacher of
`stages.teacher` (student and teacher scoring, `loss.chunked.chunked_divergence`), SFT is TRL's
SFT loss (the model's forward with TRL's fused head, as `SFTTrainer.compute_loss` calls it); each
then runs its backward, the trainer's AdamW step (`Trainer.get_optimizer_cls_and_kwargs`) and, for
OPSD, the teacher's update. The trainers are built once on a tiny model; the measured model (real or
fake) is handed to their methods. Evaluation is a prefill of the prompt and one decode step with a
KV cache of the full length, under `no_grad`, as `generate` runs them. The held-out check is the
same with the training state (weights, AdamW state, teacher) resident.

Reported per model, stage and length: measured and planned peak bytes, the largest single tensor,
seconds (real runs only), the per-layer and per-token terms fitted from several depths, the fitted
exponent of memory in tokens, and the four H200 figures of `gpu_step_bench.py` against the plan.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.distributed._tools.common_utils import get_untyped_storages  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_map_only  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

from dataclasses import replace  # noqa: E402

from opsdlab.config.memory import MODEL_SHAPES, ModelShape, Setting, basis, plan_stage, state_terms  # noqa: E402

GIB = 2**30
STAGES = ("sft", "grpo", "opsd_frozen", "opsd_ema", "eval", "check")
ACCUMULATION = 2  # micro-batches per traced step: the second runs with the first one's gradients alive
PROMPT = 256  # student prompt tokens; the teacher's prompt adds a reference solution
TEACHER_EXTRA = 512


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages: every storage an operator returns is counted until it is freed
    (a weak reference's callback), with the running peak and the largest single storage."""

    def __init__(self, breakdown: bool = False):
        super().__init__()
        self.storages = WeakIdKeyDictionary()
        self.current = self.peak = 0
        self.largest = {"bytes": 0}
        self.breakdown = breakdown  # keep, at each new peak, the live bytes by creating op and shape (slow)
        self.at_peak: dict = {}

    def track(self, *tensors, what: str = "state") -> None:
        for tensor in tensors:
            if torch.is_tensor(tensor):
                self._add(tensor, what)

    def _add(self, tensor, what: str) -> None:
        for storage in get_untyped_storages(tensor):
            if storage in self.storages:
                continue
            size = storage.nbytes()
            box = [size]
            self.storages[storage] = (box, weakref.ref(storage, lambda _, box=box: self._free(box)),
                                      (what, tuple(tensor.shape), str(tensor.dtype).split(".")[-1]))
            self.current += size
            if self.current > self.peak and self.breakdown:
                self.at_peak = {}
                for live, _, label in self.storages.values():
                    if live[0] >= 2**20:
                        self.at_peak[label] = self.at_peak.get(label, 0) + live[0]
            self.peak = max(self.peak, self.current)
            if size > self.largest["bytes"]:
                self.largest = {"bytes": size, "op": what, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}

    def _free(self, box) -> None:
        self.current -= box[0]
        box[0] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, lambda t: self._add(t, str(func.overloadpacket.__name__)), out)
        return out


def qwen3_config(shape: ModelShape, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       vocab_size=shape.vocab, tie_word_embeddings=shape.tied, max_position_embeddings=65536,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1)


def build_model(shape: ModelShape, layers: int, dtype: torch.dtype):
    """A random Qwen3 of `shape` with `layers` layers, created directly in `dtype` (under a fake mode: fake)."""
    from transformers import Qwen3ForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen3ForCausalLM(qwen3_config(shape, layers))
    finally:
        torch.set_default_dtype(previous)
    return model


def trainers(work: Path, stages=("grpo", "opsd_frozen", "opsd_ema")) -> dict:
    """The project's RLVR and OPSD trainers (frozen and EMA teacher) on a tiny model, built once; their
    methods are then called with the measured model."""
    from gpu_step_bench import build_model as tiny_folder

    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.opsd import OPSDTrainer, opsd_args
    from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset
    from opsdlab.tasks import build_task
    from opsdlab.tasks.verifier import VerifierConfig

    folder = tiny_folder(work / "tiny", tiny=True)
    task = build_task("synthetic", {})
    built = {}
    common = dict(max_steps=1, prompts_per_step=2, max_completion_length=16, gradient_checkpointing=True,
                  save_steps=10**6, logging_steps=1)
    for name in stages:
        model, tokenizer = load_policy(folder, "float32")
        dataset = rl_dataset(task.examples("train", 4), tokenizer, True)
        reward = [VerifierReward(VerifierConfig(compare="exact"), {tokenizer.eos_token_id})]
        if name == "grpo":
            config = RLVRStageConfig(**common, group_size=2)
            built[name] = RLVRTrainer(model=model, reward_funcs=reward, args=grpo_args(config, work / name, 0),
                                      train_dataset=dataset, processing_class=tokenizer)
        else:
            config = OPSDStageConfig(**common, rollouts_per_prompt=2, gate="all", chunk_size=256,
                                     teacher_weights=name.split("_")[1])
            built[name] = OPSDTrainer(model=model, reward_funcs=reward, args=opsd_args(config, work / name, 0),
                                      train_dataset=dataset, processing_class=tokenizer, opsd=config,
                                      student_thinking=True)
    return built


def batch(rows: int, completion: int, vocab: int, padding: int = 16) -> dict:
    """One micro-batch: left-padded prompts (the first row `padding` tokens shorter), completions of
    `completion` tokens, every token kept; teacher prompts carry TEACHER_EXTRA more tokens."""
    def prompts(width):
        ids = torch.randint(2, vocab, (rows, width))
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[0, :padding] = 0
        return ids, mask

    prompt_ids, prompt_mask = prompts(PROMPT)
    teacher_ids, teacher_mask = prompts(PROMPT + TEACHER_EXTRA)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(2, vocab, (rows, completion)),
            "completion_mask": torch.ones(rows, completion, dtype=torch.long),
            "opsd_token_weights": torch.ones(rows, completion),
            "teacher_prompt_ids": teacher_ids, "teacher_prompt_mask": teacher_mask,
            "advantages": torch.linspace(-1, 1, rows), "num_items_in_batch": torch.tensor(float(rows * completion)),
            "opsd_step_tokens": float(rows * completion), "route": ["reverse_kl"] * rows,
            "correct": torch.ones(rows, dtype=torch.bool), "truncated": torch.zeros(rows, dtype=torch.bool)}


def optimizer_for(trainer, model):
    """The trainer's own optimizer class and settings (`adamw_torch_fused` by default) on `model`."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def state_tensors(model, optimizer, teacher=None) -> list:
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    if teacher is not None:
        copy = getattr(teacher, "copy", None)
        if isinstance(copy, torch.nn.Module):
            tensors += list(copy.parameters()) + list(copy.buffers())
        tensors += list(getattr(teacher, "shadow", None) or [])
    return tensors


def step_function(stage: str, built: dict, model, micro: dict, accumulation: int):
    """The step of `stage` on `model`: the trainer's loss, backward, optimizer step (and teacher update)."""
    from opsdlab.stages.teacher import build_teacher

    if stage == "sft":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        trainer = built["grpo"]
    else:
        trainer = built[stage]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    model.train()
    teacher = None
    if stage == "grpo":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=trainer.temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
                          outputs=("log_probs", "entropy"))
    if stage.startswith("opsd"):
        teacher = build_teacher(trainer.opsd.teacher_weights, model, trainer.accelerator, rate=trainer.opsd.ema_rate)
        trainer.teacher = teacher
    optimizer = optimizer_for(trainer, model)

    def loss():
        if stage == "sft":  # as `sft.SFTStageTrainer.compute_loss` runs TRL's SFT loss
            from opsdlab.modeling.padding import left_aligned

            ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1)
            attn = torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1)
            labels = ids.masked_fill(attn == 0, -100)
            with left_aligned(model):
                return model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).loss
        return trainer._compute_loss(model, micro)

    def step():
        for _ in range(accumulation):
            loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.after_step(model)

    return step, optimizer, teacher


def eval_function(model, rows: int, completion: int):
    """Evaluation as `generate` runs it: the prefill of the prompt, then a decode step over a KV cache
    of prompt + completion tokens (the cache allocated at that length; no gradients, the logits of the
    last position only). The peak is the larger of the two."""
    from transformers import DynamicCache

    model.eval()
    config = model.config
    vocab = config.vocab_size

    def step():
        with torch.no_grad():
            ids = torch.randint(2, vocab, (rows, PROMPT))
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            cache = DynamicCache(config=config)
            length = PROMPT + completion
            for layer in range(config.num_hidden_layers):
                shape = (rows, config.num_key_value_heads, length, config.head_dim)
                cache.update(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype), layer)
            ids = torch.randint(2, vocab, (rows, 1))
            model(input_ids=ids, attention_mask=torch.ones(rows, length + 1, dtype=torch.long),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)

    return step


def fake_kept_tokens(weights, response):
    """`opsd.kept_tokens` for a fake trace, whose tensors have no values: every token of the batch is kept
    with weight 1 (as in `batch`), so the index is every position and each row keeps its whole width."""
    from opsdlab.stages.opsd import ScoredTokens

    rows, width = response.shape
    return ScoredTokens(response.bool(), torch.arange(rows * width), [width] * rows, float(rows * width))


def fake_row_shifts(attention_mask):
    """`padding.row_shifts` for a fake trace: the batch's rows shifted (as `batch`'s first row is), so that
    the trace holds the rolls of the left-aligned layout."""
    from opsdlab.modeling.padding import RowShifts

    return RowShifts(torch.zeros(attention_mask.shape[0], dtype=torch.long), True)


def warm_optimizer(optimizer, model) -> None:
    """Create the optimizer's state (as its first step does) without a forward: a step on zero gradients."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(stage: str, shape: ModelShape, layers: int, completion: int, rows: int, dtype: torch.dtype,
            fake: bool, built: dict, count_flops: bool = False) -> dict:
    """Peak live bytes (and the largest tensor, and seconds when real) of one steady-state step; with
    `count_flops`, its matmul FLOPs instead (`FlopCounterMode`, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils.flop_counter import FlopCounterMode

    import opsdlab.modeling.padding as padding_module
    import opsdlab.stages.opsd as opsd_module

    torch.manual_seed(0)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    import transformers.masking_utils as masking_utils
    import trl.trainer.grpo_trainer as grpo_module

    # Where the step reads values, not shapes, a fake trace is given what the values would be: the kept
    # tokens (every one), the rows' leading padding (`padding.row_shifts`), transformers' test of the
    # position ids for packed sequences (none: without it a fake trace builds the tokens x tokens mask
    # that a real step does not), the alignment check of student and teacher tokens (which the real runs
    # pass) and the NaN-skipping min/max of TRL's clip metrics (over a handful of numbers).
    # The teacher copy is placed by accelerate's prepare_model, which on one CPU process only moves it
    # to the CPU; fake parameters cannot always be swapped in place, and are on the CPU already.
    from accelerate import Accelerator

    patches = {(opsd_module, "kept_tokens"): fake_kept_tokens, (opsd_module, "check_alignment"): lambda *a: None,
               (padding_module, "row_shifts"): fake_row_shifts,
               (masking_utils, "find_packed_sequence_indices"): lambda position_ids: None,
               (Accelerator, "prepare_model"): lambda self, model, **kwargs: model,
               (grpo_module, "nanmin"): lambda t: t.min(),
               (grpo_module, "nanmax"): lambda t: t.max()} if fake else {}
    originals = {key: getattr(*key) for key in patches}
    for (module, name), value in patches.items():
        setattr(module, name, value)
    try:
        with mode:
            model = build_model(shape, layers, dtype)
            live = LiveBytes()
            if stage in ("eval", "check"):
                state = list(model.parameters())
                if stage == "check":  # the training state stays resident while a held-out check samples
                    step, optimizer, teacher = step_function("opsd_frozen", built, model, {}, 1)
                    warm_optimizer(optimizer, model)
                    state = state_tensors(model, optimizer, teacher)
                step = eval_function(model, rows, completion)
            else:
                micro = batch(rows, completion, shape.vocab)
                step, optimizer, teacher = step_function(stage, built, model, micro, ACCUMULATION)
                warm_optimizer(optimizer, model)
                state = state_tensors(model, optimizer, teacher)
            live.track(*state)
            static = live.current
            # FLOPs are counted in a pass of their own: FlopCounterMode's hooks keep tensors that
            # checkpointing would free (sdpa's converted mask, one per layer), inflating the peak.
            counter = FlopCounterMode(display=False) if count_flops else None
            start = time.perf_counter()
            with counter or live:
                step()
            seconds = time.perf_counter() - start
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)
    if count_flops:
        return {"flops": counter.get_total_flops()}
    return {"stage": stage, "layers": layers, "completion": completion, "rows": rows, "dtype": str(dtype).split(".")[-1],
            "fake": fake, "peak_bytes": live.peak, "static_bytes": static, "largest": live.largest,
"seconds": None if fake else round(seconds, 2)}


# ---------------------------------------------------------------- the plan, the fit, the comparison
PLAN_STAGE = {"sft": ("sft", "frozen"), "grpo": ("rlvr", "frozen"), "opsd_frozen": ("opsd", "frozen"),
              "opsd_ema": ("opsd", "ema"), "eval": ("eval", "frozen"), "check": ("check", "frozen")}


def setting_of(record: dict, shape: ModelShape) -> Setting:
    """The plan's `Setting` of a traced step (one CPU process, the trace's depth, dtype and batch)."""
    stage, teacher = PLAN_STAGE[record["stage"]]
    nbytes = 2 if record["dtype"] == "bfloat16" else 4
    return Setting(stage=stage, shape=replace(shape, layers=record["layers"]), rows=record["rows"], prompt=PROMPT,
                   completion=record["completion"], teacher_prompt=PROMPT + TEACHER_EXTRA, weight_bytes=nbytes,
                   compute_bytes=nbytes, accumulation=ACCUMULATION, teacher=teacher, chunk=256, device="cpu")


def fixed_part(setting: Setting) -> int:
    """What the plan counts exactly (state), subtracted before fitting the activation coefficients."""
    if setting.stage == "eval":
        return setting.shape.parameters * setting.weight_bytes
    terms = state_terms(replace(setting, stage="opsd") if setting.stage == "check" else setting)
    if setting.stage == "check":
        terms.pop("gradients")
    return sum(terms.values())


def nnls(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Non-negative least squares by an active set: refit without the most negative coefficient."""
    import numpy as np

    a, b = np.array(rows, dtype=float), np.array(targets, dtype=float)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    active = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        if active:
            # Relative errors: each point weighs by its own size, so that small configurations count.
            weights = 1 / np.maximum(b, 1)
            solution, *_ = np.linalg.lstsq((a[:, active] / scale[active]) * weights[:, None], b * weights, rcond=None)
            x[active] = solution / scale[active]
        negative = [i for i in active if x[i] < 0]
        if not negative:
            return x.tolist()
        active.remove(min(negative, key=lambda i: x[i]))


def fit(records: list[dict]) -> dict:
    """Per plan stage, the activation coefficients (bytes per unit of `basis`) that best explain the
    traces' peaks after the exact state terms."""
    fitted = {}
    for stage in ("sft", "rlvr", "opsd", "eval"):
        chosen = [r for r in records if PLAN_STAGE[r["stage"]][0] in ({stage, "check"} if stage == "eval" else {stage})]
        if not chosen:
            continue
        names = list(basis(setting_of(chosen[0], MODEL_SHAPES[chosen[0]["model"]])))
        rows, targets = [], []
        for r in chosen:
            setting = setting_of(r, MODEL_SHAPES[r["model"]])
            measured = basis(replace(setting, stage="eval") if setting.stage == "check" else setting)
            rows.append([measured[n] for n in names])
            targets.append(r["peak_bytes"] - fixed_part(setting))
        fitted[stage] = {n: round(c, 3) for n, c in zip(names, nnls(rows, targets))}
    return fitted


def compare(records: list[dict]) -> None:
    """Add the plan's total and its error to every record."""
    for r in records:
        planned = plan_stage(setting_of(r, MODEL_SHAPES[r["model"]]))["total"]
        r["planned_bytes"] = planned
        r["plan_error"] = round(planned / r["peak_bytes"] - 1, 4)


# The exponent is fitted from 4,096 completion tokens on: below, TRL's head tile on the CPU (at most
# 4,096 tokens wide, 7 float32 copies) still grows with the tokens, a bounded buffer that stops there.
MIN_EXPONENT_TOKENS = 4096


def token_exponent(tokens, peaks) -> float:
    """p of the best fit peak = a + b x tokens^p (p from 0.5 to 3 in steps of 0.01; a and b by least
    squares): how the part of the memory that grows with the tokens grows."""
    import numpy as np

    best = (math.inf, 1.0)
    for p in np.arange(0.5, 3.0001, 0.01):
        design = np.stack([np.ones_like(tokens), tokens ** p], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, peaks, rcond=None)
        residual = float(np.sum((design @ coefficients - peaks) ** 2))
        if coefficients[1] > 0 and residual < best[0]:
            best = (residual, float(p))
    return round(best[1], 2)


def exponents(records: list[dict]) -> dict:
    """Per model and stage at full depth, over the traced lengths up to 16k: the exponent of memory in
    tokens (`token_exponent`) and the largest tensor at the longest."""
    import numpy as np

    out = {}
    for model, shape in MODEL_SHAPES.items():
        for stage in STAGES:
            chosen = sorted((r for r in records if r["model"] == model and r["stage"] == stage
                             and r["layers"] == shape.layers and MIN_EXPONENT_TOKENS <= r["completion"] <= 16384),
                            key=lambda r: r["completion"])
            if len(chosen) < 2:
                continue
            tokens = np.array([r["completion"] + PROMPT for r in chosen], dtype=float)
            peaks = np.array([r["peak_bytes"] for r in chosen], dtype=float)
            out[f"{model} {stage}"] = {"exponent": token_exponent(tokens, peaks),
                                       "lengths": [r["completion"] for r in chosen],
                                       "largest": chosen[-1]["largest"]}
    return out


# gpu_step_bench.py on one H200: bf16 weights and mixed precision, gradient checkpointing, frozen teacher,
# adamw_torch_fused, torch.cuda.max_memory_allocated. 16 x 128: --prompts 4 --rollouts 4 --accumulation 1
# (benchmarks/results/gpu_step_bench_h200_*.json). 32 x 256: the script's defaults (--prompts 8 --rollouts 4
# --accumulation 16, so 2 rollouts per micro-batch) with --completion 256, assumed: no result file
# records that run. Prompts of the synthetic task are about 64 tokens.
H200 = [{"stage": "rlvr", "rollouts": 16, "completion": 128, "rows": 16, "accumulation": 1, "gib": 13.48},
        {"stage": "opsd", "rollouts": 16, "completion": 128, "rows": 16, "accumulation": 1, "gib": 17.31},
        {"stage": "rlvr", "rollouts": 32, "completion": 256, "rows": 2, "accumulation": 16, "gib": 14.2},
        {"stage": "opsd", "rollouts": 32, "completion": 256, "rows": 2, "accumulation": 16, "gib": 18.3}]


def h200() -> list[dict]:
    out = []
    for point in H200:
        setting = Setting(stage=point["stage"], shape=MODEL_SHAPES["Qwen3-1.7B"], rows=point["rows"], prompt=64,
                          completion=point["completion"], teacher_prompt=64 + 256, weight_bytes=2, compute_bytes=2,
                          accumulation=point["accumulation"], teacher="frozen", chunk=1024, device="cuda")
        planned = plan_stage(setting)["total"] / GIB
        out.append({**point, "planned_gib": round(planned, 2), "plan_error": round(planned / point["gib"] - 1, 4)})
    return out


def grid(full: bool) -> list[tuple[str, str, int, int]]:
    """(model, stage, layers, completion) of every fake trace: depths 1 (and 2) and all layers,
    completions 1k-16k, and 32k at full depth for Qwen3-1.7B."""
    lengths = (1024, 2048, 4096, 8192, 16384) if full else (1024, 4096, 8192, 16384)
    points = []
    for model in ("Qwen3-1.7B", "Qwen3-8B"):
        layers_all = MODEL_SHAPES[model].layers
        for stage in STAGES:
            for layers in ((1, 2, layers_all) if full else (1, layers_all)):
                points += [(model, stage, layers, length) for length in lengths]
            if model == "Qwen3-1.7B":
                points.append((model, stage, layers_all, 32768))
    return points


def plot(records: list[dict], flops: dict, path: Path) -> None:
    """Peak memory (measured, and the plan on a GPU) and FLOPs per step against completion length, per
    stage, for Qwen3-1.7B at full depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = MODEL_SHAPES["Qwen3-1.7B"]
    fig, (memory, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        chosen = sorted((r for r in records if r["model"] == "Qwen3-1.7B" and r["stage"] == stage
                         and r["layers"] == shape.layers), key=lambda r: r["completion"])
        if not chosen:
            continue
        x = [r["completion"] for r in chosen]
        line, = memory.plot(x, [r["peak_bytes"] / GIB for r in chosen], marker="o", label=stage)
        memory.plot(x, [r["planned_bytes"] / GIB for r in chosen], linestyle="--", color=line.get_color())
        points = sorted((int(k), v) for k, v in flops.get(stage, {}).items())
        if points:
            cost.plot([k for k, _ in points], [v / 1e12 for _, v in points], marker="o", label=stage,
                      color=line.get_color())
    memory.set(xscale="log", yscale="log", xlabel="completion tokens (prompt 256), 1 sequence",
               ylabel="peak live tensors, GiB", title="Qwen3-1.7B, bf16, checkpointed: measured (o), plan (--)")
    cost.set(xscale="log", yscale="log", xlabel="completion tokens (prompt 256), 1 sequence",
             ylabel="TFLOPs per step (matmul and attention)", title="Work per step, 2 micro-batches")
    memory.legend(fontsize=8)
    cost.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def recompare(source: Path, out: Path, plot_path: str | None) -> int:
    """The comparison of an earlier result's traces with the current plan: refit, errors, exponents,
    H200 figures, figure. The traces themselves are not repeated."""
    result = json.loads(source.read_text())
    records = result["records"]
    result["fitted_coefficients"] = fit(records)
    compare(records)
    worst = max(records, key=lambda r: abs(r["plan_error"]))
    result.update(worst_plan_error={k: worst[k] for k in ("model", "stage", "layers", "completion", "plan_error")},
                  exponents=exponents(records), h200=h200(), recompared=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if plot_path:
        plot(records, result.get("flops", {}), Path(plot_path))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"worst plan error {worst['plan_error']:+.1%}; wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--full", action="store_true", help="depths 1, 2 and all; five lengths 1k-16k (default: "
                                                            "depths 1 and all, 1k, 4k, 8k, 16k)")
    parser.add_argument("--no-real", action="store_true", help="skip the real (computed) one-layer steps")
    parser.add_argument("--fit", action="store_true", help="print the fitted coefficients for config.memory")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    parser.add_argument("--from", dest="source", default=None,
                        help="no tracing: take the traces of this earlier result and compare them with the plan "
                             "as it is now (after its coefficients changed)")
    args = parser.parse_args()
    if args.source:
        return recompare(Path(args.source), Path(args.json), args.plot)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    built = trainers(Path(tempfile.mkdtemp(prefix="opsdlab-real-shapes-")))
    records, real = [], []
    for model, stage, layers, completion in grid(args.full):
        record = measure(stage, MODEL_SHAPES[model], layers, completion, 1, torch.bfloat16, True, built)
        records.append({"model": model, **record})
        print(f"{model} {stage:12s} layers {layers:2d} completion {completion:6d}: "
              f"{record['peak_bytes'] / GIB:7.2f} GiB, largest {record['largest'].get('shape')}", flush=True)
    if not args.no_real:
        for stage in ("grpo", "opsd_frozen"):
            pair = {}
            for fake in (False, True):
                pair["fake" if fake else "real"] = measure(stage, MODEL_SHAPES["Qwen3-1.7B"], 1, 256, 1, torch.bfloat16,
                                                           fake, built)
            real.append({"model": "Qwen3-1.7B", "stage": stage, "layers": 1, "completion": 256,
                         "real_peak_bytes": pair["real"]["peak_bytes"], "fake_peak_bytes": pair["fake"]["peak_bytes"],
                         "real_seconds": pair["real"]["seconds"]})
            print(f"real vs fake {stage}: {real[-1]}", flush=True)
    fitted = fit(records)
    if args.fit:
        print(json.dumps(fitted, indent=1))
    compare(records)
    flops = {}
    if args.plot:
        for stage in ("sft", "grpo", "opsd_frozen"):
            for completion in (1024, 4096, 16384):
                flops.setdefault(stage, {})[str(completion)] = measure(
                    stage, MODEL_SHAPES["Qwen3-1.7B"], MODEL_SHAPES["Qwen3-1.7B"].layers, completion, 1, torch.bfloat16,
                    True, built, count_flops=True)["flops"]
        plot(records, flops, Path(args.plot))
    worst = max(records, key=lambda r: abs(r["plan_error"]))
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
              "seconds": round(time.perf_counter() - start, 1), "prompt_tokens": PROMPT,
              "teacher_prompt_tokens": PROMPT + TEACHER_EXTRA, "accumulation": ACCUMULATION,
              "fitted_coefficients": fitted, "worst_plan_error": {k: worst[k] for k in
                                                                  ("model", "stage", "layers", "completion", "plan_error")},
              "exponents": exponents(records), "h200": h200(), "real_vs_fake": real, "flops": flops,
              "records": records}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"worst plan error {worst['plan_error']:+.1%} ({worst['model']} {worst['stage']} {worst['layers']} layers "
          f"{worst['completion']} tokens); H200: " + ", ".join(f"{p['stage']} {p['rollouts']}x{p['completion']} "
                                                          f"{p['planned_gib']} vs {p['gib']} GiB" for p in result["h200"]))
    print(f"wrote {args.json} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
