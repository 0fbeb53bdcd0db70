"""Will a stage fit the GPU: the predicted peak memory of every stage's step, from the model's shape
and the stage's settings, before any model loads (`opsdlab plan`, the pre-flight line).

Plain arithmetic on a `ModelShape` (read from the model folder's config.json, or the table of known
Qwen3 shapes) and a `Setting` (micro-batch, lengths, dtypes, checkpointing, teacher, LoRA): no torch,
so that the answer comes in well under a second. Every term is a count of what the step holds,
named after it; docs/memory.md gives each one, where it comes from in the code, and how it was
checked against the bytes of live tensors measured on a CPU (`benchmarks/real_shapes.py`) and on an
H200.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the plan reads of a decoder-only transformer's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def per_layer(self) -> int:
        """Parameters of one decoder layer: attention (q, k, v, o and Qwen3's q/k norms), MLP, two norms."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 2 * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def parameters(self) -> int:
        head = 0 if self.tied else self.embedding
        return self.embedding + head + self.layers * self.per_layer + self.hidden

    @property
    def largest_parameter(self) -> int:
        return self.embedding


# config.json of each model (architecture only), for when its folder is not on this machine.
MODEL_SHAPES = {
    "Qwen3-0.6B": ModelShape(1024, 3072, 28, 16, 8, 128, 151936, True),
    "Qwen3-1.7B": ModelShape(2048, 6144, 28, 16, 8, 128, 151936, True),
    "Qwen3-4B": ModelShape(2560, 9728, 36, 32, 8, 128, 151936, True),
    "Qwen3-8B": ModelShape(4096, 12288, 36, 32, 8, 128, 151936, False),
    "Qwen3-14B": ModelShape(5120, 17408, 40, 40, 8, 128, 151936, False),
}


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30
TRL_TILE_ROWS, TRL_TILE_COLUMNS = 4096, 32768  # TRL's fused log-prob head: tokens x vocabulary per tile

# Activation terms of one micro-batch, in bytes per unit of each basis (`basis`), per stage and device.
# Fitted (non-negative least squares) to the live bytes of steps traced on a CPU at Qwen3-1.7B's and
# -8B's shapes, 1, 2 and all layers, 1k-16k-token completions (benchmarks/real_shapes.py --fit,
# benchmarks/results/real_shapes.json); docs/memory.md gives the fit and its residuals. On a GPU, the
# two CPU-only buffers are left out (see `device_terms`).
COEFFICIENTS = {
    # checkpoints ~1: each layer's input; token ~1.8 bytes per token x (hidden + intermediate) x compute
    # bytes: one layer recomputed and differentiated at a time, and the final hidden states; tile ~31 bytes
    # per element: TRL's torch fold on the CPU (seven float32 buffers and the bf16 product per tile element;
    # 2 on a GPU); head ~4 bytes per V x D: the float32 gradient of the head and its cast. No term grows
    # faster than the tokens (`modeling.padding`: no tokens x tokens attention mask).
    "sft": {"checkpoints": 1.001, "token": 1.762, "head": 4.05, "tile": 30.85},
    "rlvr": {"checkpoints": 1.001, "token": 1.763, "head": 4.05, "tile": 30.85},
    # token ~2.3: the student's and the teacher's forward; head ~18 bytes per V x D on the CPU: float32
    # copies of the student's and teacher's head weight (8), the head's float32 gradient and its bf16
    # casts; tile ~6 bytes per chunk x V: one chunk's logits.
    "opsd": {"checkpoints": 1.0, "token": 2.281, "head": 17.991, "tile": 6.118},
    # cache ~1.1: the KV cache (with one more layer's worth as a decode step appends to it); token
    # ~1.9: the prompt's prefill (the traces' prompts are all 256 tokens, so the prompt's mask and the
    # last position's logits are not told apart from it and fit 0).
    "eval": {"cache": 1.117, "token": 1.895, "logits": 0.0, "mask": 0.0},
}


@dataclass(frozen=True)
class Setting:
    """One process's step of one stage, as the plan reads it.

    `rows` is the micro-batch in sequences (a training stage's per-device batch; an evaluation's
    batch_size), `prompt` and `completion` their tokens, `teacher_prompt` the OPSD teacher's prompt.
    `compute_bytes` is 2 under bf16 mixed precision or with bf16 weights, else 4. `teacher` is the
    OPSD teacher's weights (frozen, ema, periodic, live) and `zero` the DeepSpeed ZeRO stage (0: none)
    over `processes`. `vllm_fraction` is the share of the GPU a colocated vLLM engine reserves.
    """

    stage: str
    shape: ModelShape
    rows: int
    prompt: int
    completion: int
    teacher_prompt: int = 0
    weight_bytes: int = 4
    compute_bytes: int = 2
    checkpointing: bool = True
    accumulation: int = 1
    teacher: str = "frozen"
    lora_r: int = 0
    zero: int = 0
    processes: int = 1
    chunk: int = 256
    vllm_fraction: float = 0.0
    device: str = "cuda"


def lora_parameters(shape: ModelShape, r: int) -> int:
    """Trainable parameters of rank-r LoRA adapters on every linear layer of the decoder (all-linear)."""
    attention = (shape.hidden + shape.heads * shape.head_dim) * 2 + (shape.hidden + shape.kv_heads * shape.head_dim) * 2
    mlp = 3 * (shape.hidden + shape.intermediate)
    return shape.layers * r * (attention + mlp)


def state_terms(s: Setting) -> dict[str, int]:
    """Weights, gradients, optimizer state and teacher of a training step, in bytes per process.

    AdamW (torch's, TRL's default adamw_torch_fused) keeps two moments in the weights' dtype; under
    ZeRO (1-3) DeepSpeed keeps float32 moments and a float32 master copy, partitioned over processes,
    and ZeRO-2/3 partition the gradients, ZeRO-3 the weights too. The frozen and periodic teachers are
    a copy of the weights; the EMA teacher adds float32 shadow weights unless the weights are float32
    (then the copy is the shadow); with LoRA the teacher is an adapter of the student (no copy).
    """
    p = s.shape.parameters
    trainable = lora_parameters(s.shape, s.lora_r) if s.lora_r else p
    wb, n = s.weight_bytes, max(s.processes, 1)
    weights = p * wb // (n if s.zero >= 3 else 1)
    gradients = trainable * wb // (n if s.zero >= 2 else 1)
    optimizer = trainable * 2 * wb if s.zero == 0 else trainable * (8 + (4 if wb < 4 else 0)) // n
    terms = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
    if s.stage == "opsd" and s.teacher != "live" and not s.lora_r:
        terms["teacher"] = p * wb // (n if s.zero >= 3 else 1)
        if s.teacher == "ema" and wb < 4:
            terms["ema_shadow"] = p * 4 // (n if s.zero >= 3 else 1)
    return terms


def basis(s: Setting) -> dict[str, float]:
    """The quantities activation memory is proportional to (bytes per unit in `COEFFICIENTS`).

    checkpoints: each layer's input kept by gradient checkpointing (layers x tokens x hidden x bytes);
    without checkpointing every layer keeps its activations (`NO_CHECKPOINT_FACTOR` times more).
    token: one layer recomputed and differentiated at a time, and the final hidden states, per token
    (tokens x (hidden + intermediate) x bytes). head: vocabulary x hidden (the LM head's float32
    gradient and its cast). tile: TRL's head tile (at most 4096 tokens x 32768 columns) or the OPSD
    loss chunk (chunk x vocabulary): the largest tensors of a step, bounded in length. No training term
    grows faster than the tokens: a padded batch is scored without a tokens x tokens attention mask
    (`modeling.padding`). mask: the prompts' attention mask in an evaluation's prefill (rows x prompt^2
    bytes). cache: the KV cache of an evaluation (layers x 2 x kv heads x head dim x tokens x bytes).
    """
    shape, ab = s.shape, s.compute_bytes
    tokens = s.rows * (s.prompt + s.completion)
    if s.stage == "eval":  # the prompt's prefill, then decoding over a cache of the whole length
        # Every layer's keys and values, and one layer's again while a decode step appends to it.
        return {"cache": (s.shape.layers + 1) * 2 * shape.kv_heads * shape.head_dim * tokens * ab,
                "token": s.rows * s.prompt * (shape.hidden + shape.intermediate) * ab, "logits": s.rows * shape.vocab,
                "mask": s.rows * s.prompt ** 2}
    # A checkpointed layer input is the residual stream, in the weights' dtype (float32 weights under
    # bf16 mixed precision add float32 residuals); inside a layer activations are in the compute dtype.
    layer_bytes = shape.hidden * (s.weight_bytes if s.checkpointing else ab * NO_CHECKPOINT_FACTOR)
    scored = s.rows * s.completion
    # TRL's head scores only the completion's positions where Triton runs (a GPU); elsewhere every
    # position of the sequence, so that its tile shapes do not change with each batch.
    tile_rows = scored if s.device == "cuda" else tokens
    tile = (min(tile_rows, TRL_TILE_ROWS) * TRL_TILE_COLUMNS if s.stage in ("sft", "rlvr")
            else min(s.chunk, scored) * shape.vocab)
    return {"checkpoints": shape.layers * tokens * layer_bytes,
            "token": tokens * (shape.hidden + shape.intermediate) * ab,
            "head": shape.vocab * shape.hidden, "tile": tile}


# Activations a layer keeps without checkpointing, in hidden-size vectors per token: 30.7 measured at
# Qwen3-1.7B's shape (intermediate = 3 x hidden), GRPO, 4k tokens, 2 layers less 1 (benchmarks/real_shapes.py).
NO_CHECKPOINT_FACTOR = 31


def coefficients(s: Setting) -> dict[str, float]:
    """`COEFFICIENTS` of a stage on its device. Two buffers of the CPU traces are CPU-only: TRL's
    head folds each tile in float32 torch operations there (a Triton kernel on a GPU holds only the
    tile, `compute_bytes` per element), and the OPSD head without a bf16 GEMM that writes float32
    keeps a float32 copy of the student's and the teacher's head weight (`models.output_head`;
    8 bytes per vocabulary x hidden, not held on a GPU)."""
    stage = "eval" if s.stage in ("eval", "check") else s.stage
    fitted = dict(COEFFICIENTS[stage])
    if s.device == "cpu" or stage == "eval":
        return fitted
    if stage in ("sft", "rlvr"):
        fitted["tile"] = s.compute_bytes
    else:
        fitted["head"] = max(fitted["head"] - 8, 0)
    return fitted


def activation_terms(s: Setting) -> dict[str, int]:
    coefficients_ = coefficients(s)
    measured = basis(replace(s, stage="eval") if s.stage == "check" else s)
    return {name: int(coefficients_[name] * value) for name, value in measured.items()}


def plan_stage(s: Setting) -> dict[str, int]:
    """Every term of one process's peak, in bytes, and their `total` (with `vllm`, the engine's reserve).

    A training step peaks either while the loss and the LM head's backward run, with every
    activation of the micro-batch alive and, from the second micro-batch of gradient accumulation
    on, the gradients too; or at the end of the backward, once every gradient exists (the tied
    embedding's gradient then added to the head's). An evaluation holds its weights and KV cache;
    a held-out check adds the training state resident meanwhile.
    """
    if s.stage == "eval":
        terms = {"weights": s.shape.parameters * s.weight_bytes, **activation_terms(s)}
    elif s.stage == "check":
        state = state_terms(replace(s, stage="opsd"))
        terms = {**{k: v for k, v in state.items() if k != "gradients"}, **activation_terms(s)}
    else:
        state = state_terms(s)
        activations = activation_terms(s)
        resident = sum(v for k, v in state.items() if k != "gradients")
        during_loss = resident + (state["gradients"] if s.accumulation > 1 else 0) + sum(activations.values())
        tied_add = s.shape.embedding * s.weight_bytes if s.shape.tied and not s.lora_r else 0
        end_of_backward = resident + state["gradients"] + tied_add
        terms = {**state, **activations}
        if s.accumulation == 1:
            terms["gradients"] = 0
        if end_of_backward > during_loss:
            terms = {**state, "tied_embedding_gradient": tied_add}
    terms = {k: v for k, v in terms.items() if v}
    terms["total"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------- a config's stages, and the verdicts
DEFAULT_GPUS = {"80 GB": 80e9, "141 GB": 141e9}
FIT_MARGIN = 0.9  # "fits" up to 90% of the GPU: the CUDA context and the allocator's cache are not live tensors
PROMPT_TOKENS, SOLUTION_TOKENS = 512, 1024  # a math problem in its chat template; a reference solution


def hub_cache() -> Path:
    """Where the Hugging Face hub cache is (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def shape_from_config(path: Path) -> ModelShape:
    """A `ModelShape` from a config.json (its text config for a multimodal model)."""
    data = json.loads(Path(path).read_text())
    data = data.get("text_config", data)
    heads = data["num_attention_heads"]
    return ModelShape(hidden=data["hidden_size"], intermediate=data["intermediate_size"],
                      layers=data["num_hidden_layers"], heads=heads, kv_heads=data.get("num_key_value_heads", heads),
                      head_dim=data.get("head_dim") or data["hidden_size"] // heads, vocab=data["vocab_size"],
                      tied=bool(data.get("tie_word_embeddings", False)))


def model_shape(init: str) -> tuple[ModelShape, str]:
    """The shape of the model `init` names, and where it was read: the folder's config.json, the Hugging
    Face cache's snapshot of a Hub id, or the table of known shapes (`MODEL_SHAPES`, by the longest
    known name the folder's name starts with: Qwen3-8B-RL is a Qwen3-8B)."""
    folder = Path(init).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(folder / "config.json"), str(folder / "config.json")
    if "/" in init and not folder.exists():
        snapshots = sorted((hub_cache() / f"models--{init.replace('/', '--')}" / "snapshots").glob("*/config.json"))
        if snapshots:
            return shape_from_config(snapshots[-1]), str(snapshots[-1])
    name = folder.name.lower()
    known = [key for key in MODEL_SHAPES if name.startswith(key.lower())]
    if not known:
        raise ValueError(f"model.init: {init} has no config.json here and is not a known shape "
                         f"({', '.join(MODEL_SHAPES)}); give a model folder or set model.init to one of those")
    key = max(known, key=len)
    return MODEL_SHAPES[key], f"the known shape of {key}"


def settings_for(config, shape: ModelShape, *, processes: int = 1, zero: int = 0,
                 device: str = "cuda") -> list[tuple[str, Setting]]:
    """One `Setting` per stage of a `PipelineConfig` (each distinct OPSD arm, evaluation, held-out
    checks), on one of `processes` processes; prompts of PROMPT_TOKENS, teacher prompts adding a
    reference solution of SOLUTION_TOKENS."""
    wb = DTYPE_BYTES[config.model.dtype]
    common = dict(shape=shape, weight_bytes=wb, compute_bytes=2 if device == "cuda" else wb, zero=zero,
                  processes=processes, device=device)
    out = []
    if "sft" in config.stages:
        sft = config.sft
        out.append(("sft", Setting(stage="sft", rows=sft.per_device_batch(processes), prompt=0,
                                   completion=sft.max_length, checkpointing=sft.gradient_checkpointing,
                                   accumulation=sft.gradient_accumulation_steps, **common)))
    if "rlvr" in config.stages:
        out.append(("rlvr", _generating("rlvr", config.rlvr, config.rlvr.per_device_batch(processes), common)))
    if "opsd" in config.stages:
        seen = {}
        for arm in config.arms:
            section = config.arm_config(arm)
            if section.method == "budget":
                continue
            setting = _generating("opsd", section, section.per_device_batch(processes), common)
            setting = replace(setting, teacher=section.teacher_weights, lora_r=section.lora_r, chunk=section.chunk_size,
                              teacher_prompt=PROMPT_TOKENS + SOLUTION_TOKENS)
            seen.setdefault(setting, []).append(arm.name)
        out += [(f"opsd ({', '.join(names)})", setting) for setting, names in seen.items()]
    for label, setting in list(out):
        section = config.rlvr if label == "rlvr" else None
        if label.startswith("opsd"):
            section = config.arm_config(next(arm for arm in config.arms if arm.name in label))
        if section is not None and section.check_every > 0:
            # A held-out check samples with the training model (transformers' generate, 128 sequences at
            # a time) while the weights, AdamW state and teacher stay resident.
            out.append((f"{label.split(' ')[0]} check", replace(
                setting, stage="check", rows=min(128, section.check_problems * section.check_k),
                teacher=setting.teacher if label.startswith("opsd") else "live",
                completion=section.check_max_new_tokens or section.max_completion_length, vllm_fraction=0.0)))
    sampling = config.eval.sampling
    eval_bytes = DTYPE_BYTES[config.eval.dtype or config.model.dtype]
    vllm = config.eval.vllm.gpu_memory_utilization if config.eval.backend == "vllm" else 0.0
    out.append(("eval", Setting(stage="eval", shape=shape, rows=sampling.batch_size, prompt=PROMPT_TOKENS,
                                completion=sampling.max_new_tokens, weight_bytes=eval_bytes, compute_bytes=eval_bytes,
                                vllm_fraction=vllm, device=device)))
    return out


def _generating(stage: str, section, rows: int, common: dict) -> Setting:
    colocated = section.use_vllm or section.generation_backend == "vllm"
    vllm = section.vllm_gpu_memory_utilization if colocated and section.vllm_mode == "colocate" else 0.0
    return Setting(stage=stage, rows=rows, prompt=PROMPT_TOKENS, completion=section.max_completion_length,
                   checkpointing=section.gradient_checkpointing, accumulation=section.gradient_accumulation_steps,
                   vllm_fraction=vllm, **common)


def process_total(s: Setting, gpu_bytes: float) -> float:
    """Bytes one process needs on a GPU of `gpu_bytes`: the step's peak, plus a colocated vLLM engine's
    reserve (its fraction of the GPU). An evaluation on vLLM is the engine alone (its KV cache lives
    in the reserve)."""
    if s.stage == "eval" and s.vllm_fraction:
        return s.vllm_fraction * gpu_bytes
    return plan_stage(s)["total"] + s.vllm_fraction * gpu_bytes


def verdict(s: Setting, gpu_bytes: float) -> str:
    need = process_total(s, gpu_bytes)
    if need <= FIT_MARGIN * gpu_bytes:
        return "fits"
    return "tight" if need <= gpu_bytes else "does not fit"


def remedies(label: str, s: Setting, gpu_bytes: float) -> list[str]:
    """Settings that would make `s` fit `gpu_bytes`, each with its new total: a smaller micro-batch
    (more gradient-accumulation steps), gradient checkpointing, ZeRO-3 over the processes, LoRA
    adapters (OPSD), a shorter completion."""
    section = label.split(" ")[0]
    candidates = []
    rows = s.rows
    while s.stage in ("sft", "rlvr", "opsd") and rows > 1:  # the largest micro-batch that fits
        rows //= 2
        smaller = replace(s, rows=rows, accumulation=s.accumulation * s.rows // rows)
        if verdict(smaller, gpu_bytes) != "does not fit" or rows == 1:
            candidates.append((f"{section}.gradient_accumulation_steps={smaller.accumulation} (micro-batch {rows})",
                               smaller))
            break
    if s.stage in ("sft", "rlvr", "opsd") and not s.checkpointing:
        candidates.append((f"{section}.gradient_checkpointing=true", replace(s, checkpointing=True)))
    if s.stage in ("sft", "rlvr", "opsd") and s.zero < 3 and s.processes > 1:
        candidates.append(("accelerate --config_file zero3.yaml", replace(s, zero=3)))
    if s.stage == "opsd" and not s.lora_r:
        candidates.append(("opsd.lora_r=64", replace(s, lora_r=64)))
    key = "eval.sampling.max_new_tokens" if s.stage == "eval" else (
        f"{section}.max_length" if s.stage == "sft" else f"{section}.max_completion_length")
    completion = s.completion
    while completion > 1024:  # the longest completion that fits
        completion //= 2
        if verdict(replace(s, completion=completion), gpu_bytes) != "does not fit":
            candidates.append((f"{key}={completion}", replace(s, completion=completion)))
            break
    return [f"{change}: {process_total(changed, gpu_bytes) / GIB:.1f} GiB" for change, changed in candidates
            if verdict(changed, gpu_bytes) != "does not fit"]


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def describe(label: str, s: Setting, gpus: dict[str, float]) -> list[str]:
    """Lines of `opsdlab plan` for one stage: its terms, the total, and a verdict per GPU."""
    terms = plan_stage(s)
    parts = "  ".join(f"{name} {gib(value)}" for name, value in terms.items() if name != "total")
    tokens = f"{s.rows} x {s.prompt + s.completion:,} tokens"
    lines = [f"{label}: {tokens}; {parts}; peak {gib(terms['total'])} GiB"]
    if s.stage == "eval" and s.vllm_fraction:
        lines[0] = (f"{label}: {tokens} on vLLM; weights {gib(terms['weights'])}  KV cache {gib(terms.get('cache', 0))} "
                    f"(every sequence at full length; transformers' generate would peak at {gib(terms['total'])} GiB)")
    for name, size in gpus.items():
        need = process_total(s, size)
        extra = f" with vLLM's {s.vllm_fraction:.0%} ({gib(s.vllm_fraction * size)} GiB)" if s.vllm_fraction else ""
        if s.stage == "eval" and s.vllm_fraction:
            room = s.vllm_fraction * size - terms["weights"]
            extra = (f" reserved by vLLM ({s.vllm_fraction:.0%}); its KV cache room {gib(room)} GiB "
                     + ("holds the whole batch" if room >= terms.get("cache", 0) else
                        "holds part of the batch: vLLM runs fewer sequences at once"))
        line = f"    {name}: {verdict(s, size)}, {gib(need)} GiB{extra}"
        if verdict(s, size) == "does not fit":
            fixes = remedies(label, s, size)
            line += "; would fit with " + "; or ".join(fixes) if fixes else "; no single change here makes it fit"
        lines.append(line)
    return lines


def parse_size(text: str) -> float:
    """Bytes of a GPU memory size: 80GB (10^9), 80GiB (2^30), or a number of GB."""
    units = {"gib": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6}
    lowered = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return float(lowered[: -len(unit)]) * factor
    return float(lowered) * 1e9
