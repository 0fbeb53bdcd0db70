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
same decode with the training state (weights, AdamW state, teacher) resident.

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

from opsdlab.config.memory import MODEL_SHAPES, ModelShape  # noqa: E402

GIB = 2**30
STAGES = ("sft", "grpo", "opsd_frozen", "opsd_ema", "eval_prefill", "eval_decode", "check")
PROMPT = 256  # student prompt tokens; the teacher's prompt adds a reference solution
TEACHER_EXTRA = 512


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages: every storage an operator returns is counted until it is freed
    (a weak reference's callback), with the running peak and the largest single storage."""

    def __init__(self):
        super().__init__()
        self.storages = WeakIdKeyDictionary()
        self.current = self.peak = 0
        self.largest = {"bytes": 0}

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
            self.storages[storage] = (box, weakref.ref(storage, lambda _, box=box: self._free(box)))
            self.current += size
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


def trainers(work: Path) -> dict:
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
    for name in ("grpo", "opsd_frozen", "opsd_ema"):
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
        if stage == "sft":
            ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1)
            attn = torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1)
            labels = ids.masked_fill(attn == 0, -100)
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


def eval_function(stage: str, model, rows: int, completion: int):
    """Evaluation's prefill of a prompt, or one decode step over a KV cache of prompt + completion
    tokens, as `generate` runs them (no gradients; logits of the last position only)."""
    from transformers import DynamicCache

    model.eval()
    vocab = model.config.vocab_size

    def prefill(tokens):
        cache = DynamicCache(config=model.config)
        ids = torch.randint(2, vocab, (rows, tokens))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        return out.past_key_values

    def step():
        with torch.no_grad():
            if stage == "eval_prefill":
                prefill(PROMPT + completion)
                return
            cache = prefill(PROMPT + completion)
            ids = torch.randint(2, vocab, (rows, 1))
            model(input_ids=ids, attention_mask=torch.ones(rows, PROMPT + completion + 1, dtype=torch.long),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)

    return step


def fake_kept_tokens(mask):
    """`opsd.kept_tokens` for a fake trace, whose mask has no values: every token of the batch is kept
    (as in `batch`), so the index is every position and each row keeps its whole width."""
    return torch.arange(mask.numel()), [mask.shape[1]] * mask.shape[0]


def warm_optimizer(optimizer, model) -> None:
    """Create the optimizer's state (as its first step does) without a forward: a step on zero gradients."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(stage: str, shape: ModelShape, layers: int, completion: int, rows: int, dtype: torch.dtype,
            fake: bool, built: dict) -> dict:
    """Peak live bytes (and the largest tensor, and seconds when real) of one steady-state step."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils.flop_counter import FlopCounterMode

    import opsdlab.stages.opsd as opsd_module

    torch.manual_seed(0)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    import trl.trainer.grpo_trainer as grpo_module

    # Where the step reads values, not shapes, a fake trace is given what the values would be: the kept
    # tokens (every one), the alignment check of student and teacher tokens (which the real runs
    # pass) and the NaN-skipping min/max of TRL's clip metrics (over a handful of numbers).
    patches = {(opsd_module, "kept_tokens"): fake_kept_tokens, (opsd_module, "check_alignment"): lambda *a: None,
               (grpo_module, "nanmin"): lambda t: t.min(),
               (grpo_module, "nanmax"): lambda t: t.max()} if fake else {}
    originals = {key: getattr(*key) for key in patches}
    for (module, name), value in patches.items():
        setattr(module, name, value)
    try:
        with mode:
            model = build_model(shape, layers, dtype)
            live = LiveBytes()
            if stage in ("eval_prefill", "eval_decode", "check"):
                state = list(model.parameters())
                if stage == "check":  # the training state stays resident while a held-out check samples
                    step, optimizer, teacher = step_function("opsd_frozen", built, model, {}, 1)
                    warm_optimizer(optimizer, model)
                    state = state_tensors(model, optimizer, teacher)
                step = eval_function("eval_decode" if stage == "check" else stage, model, rows, completion)
            else:
                micro = batch(rows, completion, shape.vocab)
                step, optimizer, teacher = step_function(stage, built, model, micro, 1)
                warm_optimizer(optimizer, model)
                state = state_tensors(model, optimizer, teacher)
            live.track(*state)
            static = live.current
            flops = FlopCounterMode(display=False)
            start = time.perf_counter()
            with live, flops:
                step()
            seconds = time.perf_counter() - start
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)
    return {"stage": stage, "layers": layers, "completion": completion, "rows": rows, "dtype": str(dtype).split(".")[-1],
            "fake": fake, "peak_bytes": live.peak, "static_bytes": static, "largest": live.largest,
            "flops": flops.get_total_flops(), "seconds": None if fake else round(seconds, 2)}
