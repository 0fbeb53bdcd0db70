"""Models and tokenizers in and out as Hugging Face folders, and the tiny offline default.

Every stage calls `load_policy(folder)` and `save_policy(model, tokenizer, folder)`, whether the
folder holds the tiny model built here or a real Qwen3-style thinking model. The tiny default is a
standard `Qwen3ForCausalLM` with random weights and a word-level tokenizer trained in-process with
the `tokenizers` library, wrapped as `PreTrainedTokenizerFast`, whose chat template takes a
per-call `enable_thinking` switch like Qwen3's. Other families' tiny models (Llama, Gemma 2,
Gemma 3) and tokenizers (their special tokens and chat templates) are built the same way for the
tests. `output_head(model)` maps hidden states to logits as the model's forward does (Gemma's
soft-capping included). Weights are read from safetensors only, and remote code stays off unless
asked for. Wherever a model folder is given, a Hugging Face Hub model id names one too
(`model_folder`: its snapshot in the Hugging Face cache).

Why one file of ~530 lines: building the tiny models and tokenizers of four families for the tests is
half of it; it can move to its own module (`modeling/tiny.py`) without touching the loading half.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opsdlab.config.choices import DTYPES
from opsdlab.modeling.padding import left_aligned
from opsdlab.modeling.parts import decoder_stack, head_module
from opsdlab.tasks.templates import THINK_CLOSE, THINK_OPEN, count_thinking_tokens

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, UNK_TOKEN]
# <think> and </think> are added tokens with ids right after the special tokens. In the default
# tokenizer the backend also marks them special, so decoding with skip_special_tokens drops them;
# `build_tiny_tokenizer(..., decode_keeps_think=True)` keeps them, as Qwen3's and DeepSeek's do.
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE]

# Qwen3-style ChatML template. With enable_thinking=false the assistant turn starts with an empty
# think block, so the model answers directly; with thinking on (default) it opens <think> itself.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


# Files of which a saved tokenizer has at least one (fast, SentencePiece, BPE, WordPiece, tiktoken: *.tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class ModelFolderError(ValueError):
    """A model folder that cannot be used, with what is wrong and how to fix it."""


# A Hub model id: `org/name`, as `hf download` and `from_pretrained` take it.
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# Weight formats no stage reads (weights are read from safetensors only): not downloaded with a Hub model.
UNREAD_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "original/*")


def is_hub_model_id(name: str | Path) -> bool:
    """Whether `name` names a Hugging Face Hub model rather than a local folder: it has the form
    `org/name` and no such path exists here (a local folder of that name wins, as in transformers)."""
    return HUB_MODEL_ID.fullmatch(str(name)) is not None and not Path(name).expanduser().exists()


def model_folder(name: str | Path, what: str = "model", download: bool = True) -> Path:
    """The local folder of a model given as a folder or as a Hub model id (`Qwen/Qwen3-1.7B`).

    A folder is returned as it is (checked where it is read). A Hub id is resolved through the
    Hugging Face cache (HF_HUB_CACHE) with `snapshot_download`: downloaded, or brought up to date,
    when online and `download`; read from the cache alone with HF_HUB_OFFLINE=1 or without
    `download`. The snapshot folder it returns is what every stage loads and what a run's records
    fingerprint, so a new revision of the model counts as a changed input. An id that is neither in
    the cache nor (online) on the Hub is a ModelFolderError naming `what` (the option it came from).
    """
    if not is_hub_model_id(name):
        return Path(name).expanduser()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=not download, ignore_patterns=list(UNREAD_WEIGHTS)))
    except LocalEntryNotFoundError as error:
        why = ("its snapshot there is incomplete" if isinstance(error, IncompleteSnapshotError) else
               "HF_HUB_OFFLINE=1 forbids downloading it" if constants.is_offline_mode() else
               "it is not downloaded" if not download else "the Hub could not be reached")
        raise ModelFolderError(
            f"{what}: {name} is neither a model folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
            f"{why}; download it with `hf download {name}` (online), or give a model folder") from None
    except (HfHubHTTPError, HFValidationError) as error:  # no such model, a gated one, a malformed id
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFolderError(
            f"{what}: {name} is neither a model folder nor a model on the Hugging Face Hub ({detail}); check the "
            "id, or log in (`hf auth login`) for a gated model") from None


@dataclass(frozen=True)
class TinySize:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024


TINY_SIZES = {
    "tiny": TinySize(),
    # 0.35M parameters: an SFT step on the 2-core CPU takes 0.6x the time of "tiny" on the same rows;
    # tried for a faster demo and not adopted (README, "A smaller task and model").
    "micro": TinySize(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=288),
    # 0.62M parameters, "tiny" with 3 layers instead of 4: the demo's SFT in 0.76x the time; tried for a
    # faster demo and not adopted, its teacher's lead did not survive RLVR in every seed (README,
    # "Three more screens").
    "shallow": TinySize(num_hidden_layers=3),
    "small": TinySize(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=576),
}


def build_tiny_tokenizer(
    corpus: list[str],
    *,
    chat_template: str = CHAT_TEMPLATE,
    special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
    bos_token: str | None = None,
    eos_token: str = IM_END,
    pad_token: str = PAD_TOKEN,
    add_bos: bool = False,
    decode_keeps_think: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `corpus`: whole numbers, words and punctuation are tokens.

    Spaces are folded into the following token (Metaspace), so decoding restores the text
    exactly and `\\boxed{18}` round-trips for the answer verifier. The defaults give the project's
    Qwen3-style tokenizer; another family's tokenizer is the same vocabulary with that family's
    `special_tokens`, `chat_template`, BOS/EOS/pad tokens and, with `add_bos`, a post-processor
    that puts BOS in front of text tokenized with special tokens (as Llama 3 and Gemma do).
    `decode_keeps_think` makes `<think>`/`</think>` ordinary tokens that survive
    `decode(skip_special_tokens=True)`, as in real reasoning-model tokenizers (same ids either way).
    """
    specials = list(dict.fromkeys([*special_tokens, UNK_TOKEN, pad_token, eos_token,
                                   *([bos_token] if bos_token else [])]))
    core = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\\boxed\{| ?\d+| ?[^\w\s]|\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.WordLevelTrainer(special_tokens=specials + ADDED_TOKENS, min_frequency=1)
    core.train_from_iterator(corpus, trainer)
    if decode_keeps_think:
        # Same vocabulary and ids, but <think>/</think> registered as ordinary added tokens.
        plain = Tokenizer(models.WordLevel(vocab=core.get_vocab(with_added_tokens=True), unk_token=UNK_TOKEN))
        plain.pre_tokenizer, plain.decoder = core.pre_tokenizer, core.decoder
        plain.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        plain.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
        core = plain
    if add_bos:
        if not bos_token:
            raise ValueError("build_tiny_tokenizer: add_bos needs a bos_token")
        bos_id = core.token_to_id(bos_token)
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    named = {UNK_TOKEN, pad_token, eos_token, bos_token}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK_TOKEN,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        additional_special_tokens=[t for t in specials if t not in named],
        padding_side="left",
        model_max_length=TinySize().max_position_embeddings,
    )
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = chat_template
    return tokenizer


def _architecture_config(architecture: str, dims: TinySize, **common):
    head_dim = dims.hidden_size // dims.num_attention_heads
    shared = dict(
        hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers, num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads, head_dim=head_dim,
        max_position_embeddings=dims.max_position_embeddings, tie_word_embeddings=True, **common,
    )
    if architecture == "qwen3":
        return Qwen3Config(**shared), Qwen3ForCausalLM
    if architecture == "llama":
        return LlamaConfig(**shared), LlamaForCausalLM
    if architecture == "gemma2":
        # Gemma 2's final-logit soft-capping (30) and attention soft-capping (50), as released.
        return Gemma2Config(**shared, query_pre_attn_scalar=head_dim, sliding_window=256,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0), Gemma2ForCausalLM
    if architecture == "gemma3":
        return Gemma3TextConfig(**shared, query_pre_attn_scalar=head_dim, sliding_window=256), Gemma3ForCausalLM
    raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(TINY_ARCHITECTURES)}")


# Tiny model architectures: Qwen3 (the default), Llama (Llama 3, DeepSeek-R1-distill-Llama),
# Gemma 2 (final-logit soft-capping) and Gemma 3 (text).
TINY_ARCHITECTURES = ("qwen3", "llama", "gemma2", "gemma3")


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0,
                     architecture: str = "qwen3") -> PreTrainedModel:
    """A randomly initialised causal LM sized by `TINY_SIZES[size]`, with tied embeddings.

    `architecture` is one of TINY_ARCHITECTURES; the default is a Qwen3ForCausalLM.
    """
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(TINY_SIZES)}")
    config, model_class = _architecture_config(
        architecture, TINY_SIZES[size], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model folder; it must carry a chat template.

    A folder whose tokenizer_config names `PreTrainedTokenizerFast` is loaded with that class
    directly: AutoTokenizer would otherwise map the model type (qwen3) to Qwen's own tokenizer
    class and silently build it around the custom vocabulary.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if not any((folder / name).exists() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ModelFolderError(
            f"model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "every stage reads the tokenizer and its chat template from the model folder. Save the tokenizer "
            "of the model these weights come from into it (tokenizer.save_pretrained(folder))."
        )
    config_path = folder / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.exists() else None
    try:
        if declared == "PreTrainedTokenizerFast":
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"model folder {folder}: cannot load its tokenizer ({error})") from error
    if len(tokenizer) < 2 or not tokenizer("1 + 1", add_special_tokens=False)["input_ids"]:
        raise ModelFolderError(
            f"model folder {folder}: its tokenizer files load as an empty tokenizer ({type(tokenizer).__name__}, "
            f"{len(tokenizer)} tokens); the vocabulary file is missing or unreadable."
        )
    if not tokenizer.chat_template:
        raise ModelFolderError(
            f"model folder {folder}: the tokenizer has no chat template; prompts for every role are "
            "rendered through it. Add `chat_template` to tokenizer_config.json (or chat_template.jinja)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM from a Hugging Face folder, safetensors only, with weights in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ModelFolderError(f"model folder {folder} has no config.json; is it a Hugging Face model folder?")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"model folder {folder}: cannot load the model ({error})") from error
    return model


def load_policy(folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """Model and tokenizer of one folder, the way every stage starts."""
    tokenizer = load_tokenizer(folder, trust_remote_code)
    model = load_model(folder, dtype, trust_remote_code)
    return model, tokenizer


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Save model (safetensors), tokenizer and generation config so that vLLM or any stage can load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """The ids generation stops at: the tokenizer's EOS and the model's `generation_config.eos_token_id`
    (an int or a list: Gemma's instruct models end a turn with `<end_of_turn>`, Llama 3.1 lists three).
    TRL's GRPO generation stops at the same union, so training and evaluation end responses alike."""
    ids = {tokenizer.eos_token_id}
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([config_ids] if isinstance(config_ids, int) else (config_ids or []))
    return ids - {None}


def end_token_ids(tokenizer, model=None) -> set[int]:
    """The ids that end a response: the stop ids (`stop_token_ids`), and the pad token (a batch pads
    finished rows with it). Truncation is their absence, and response lengths exclude them."""
    return stop_token_ids(tokenizer, model) | ({tokenizer.pad_token_id} - {None})


def thinking_token_count(token_ids: list[int], tokenizer: PreTrainedTokenizerBase, prompt: str = "") -> int:
    """Tokens strictly between <think> and </think> in a response (0 without a think block).

    An unclosed think block (a truncated response) counts to the end. Pass the rendered `prompt`
    when the template may open the think block itself (`templates.count_thinking_tokens`).
    """
    return count_thinking_tokens(token_ids, tokenizer, prompt)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# Devices with a half-precision matrix product that writes float32 (`torch.mm(..., out_dtype=)`, CUDA).
_FLOAT32_OUT_MM_DEVICES = ("cuda",)
_HALF = (torch.bfloat16, torch.float16)


def _float32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` into float32 without rounding the product to the operands' dtype (as TRL's chunked kernels).

    Half-precision operands on CUDA: one half-precision GEMM with float32 output; elsewhere the
    (half-precision-valued) operands are upcast and multiplied in float32, the same exact products.
    """
    if a.dtype in _HALF and a.dtype == b.dtype and a.device.type in _FLOAT32_OUT_MM_DEVICES:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _Float32Linear(torch.autograd.Function):
    """`linear(hidden, weight, bias)` with operands in `dtype` and float32 logits out.

    The gradient products take the logits' gradient in `dtype` and accumulate in float32 (TRL's
    `_addmm_fp32`); the gradients are returned in the inputs' own dtypes. `weight32`: the weight's
    `dtype` values already in float32 (`_Float32Weight`), used instead of casting it again.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, dtype, weight32=None):
        with _no_autocast(hidden.device.type):
            h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
            w = weight.to(dtype) if weight32 is None else weight32
            out = _float32_mm(h, w.t())
            if bias is not None:
                out = out + bias.float()
        ctx.save_for_backward(h, w)
        ctx.dtype, ctx.hidden_shape, ctx.hidden_dtype = dtype, hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        with _no_autocast(grad.device.type):
            g = grad.reshape(-1, grad.shape[-1])
            g_half = g.to(ctx.dtype)
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = _float32_mm(g_half, w).reshape(ctx.hidden_shape).to(ctx.hidden_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _float32_mm(g_half.t(), h).to(ctx.weight_dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


class _Float32Weight:
    """One float32 copy of a half-precision weight's values, made again only when the weight changes.

    Where no half-precision GEMM writes float32 (CPU), `_float32_mm` multiplies in float32 and would
    copy the whole LM head weight to float32 for every product: at Qwen3's vocabulary 151,936 x 2,048
    values, a copy per chunk and pass (forward, checkpointed recomputation, backward). The copy is
    the same exact values, so results do not change; it lives as long as the head that holds it.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def __call__(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if weight.device.type in _FLOAT32_OUT_MM_DEVICES:
            return None
        key = (weight.data_ptr(), weight._version, weight.dtype, dtype, tuple(weight.shape))
        if key != self.key:
            self.value = None  # the old copy goes before the new one is made
            with torch.no_grad():
                self.value = weight.detach().to(dtype).float()
            self.key = key
        return self.value


def head_dtype(accelerator) -> torch.dtype | None:
    """The LM head's operand dtype that a launch's mixed precision asks for (None: the weights' own)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(getattr(accelerator, "mixed_precision", "no")))


def output_head(model, compute_dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> logits exactly as the model's forward computes them from its final hidden states.

    The LM head (`model.get_output_embeddings()`), then the family's logit scaling: Cohere's
    `logit_scale` (multiplied), Granite's `logits_scaling` (divided), and Gemma 2/3's
    `final_logit_softcapping` (`tanh(logits / cap) * cap`). Use it wherever the LM head is applied
    to hidden states outside the model's forward; `check_output_head` verifies it on a model.

    Precision, as TRL's chunked log-prob and divergence kernels: the product runs in the compute
    dtype, i.e. the active autocast dtype, else `compute_dtype` (a launch's mixed precision:
    `head_dtype`), else the weights' dtype. A half-precision compute dtype gives half-precision
    operands and float32 logits (no logit rounded to bf16 before a softmax); a float32 one is the
    plain float32 head. Without a half-precision GEMM that writes float32 (CPU) the head keeps one
    float32 copy of its weight while the weight is unchanged (`_Float32Weight`): the returned function
    holds it, so build the head per step or micro-batch. An LM head that is not a plain `nn.Linear` (a PEFT-wrapped head) runs as its
    own module in the compute dtype, its logits upcast afterwards.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    config = _text_config(model)
    model_type = str(getattr(config, "model_type", ""))
    multiplier = 1.0
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        multiplier *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scaling = float(config.logits_scaling)
        multiplier *= scaling if model_type.startswith("hyperclovax") else 1.0 / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    cap = float(cap) if cap else None

    weight32 = _Float32Weight()

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        weight = getattr(head, "weight", None)
        dtype = (_autocast_dtype(hidden.device.type) or compute_dtype
                 or (weight.dtype if weight is not None and weight.is_floating_point() else hidden.dtype))
        if dtype in _HALF and type(head) is torch.nn.Linear:
            out = _Float32Linear.apply(hidden, head.weight, head.bias, dtype, weight32(head.weight, dtype))
        elif dtype in _HALF:
            out = head(hidden.to(dtype)).float()
        else:
            # Under mixed precision accelerate returns the forward's outputs in float32; without it
            # the head runs in the weights' own dtype, as the forward does.
            if weight is not None and weight.is_floating_point() and hidden.dtype != weight.dtype:
                hidden = hidden.to(weight.dtype)
            out = head(hidden)
        if multiplier != 1.0:
            out = out * multiplier
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


@torch.no_grad()
def check_output_head(model, head: Callable[[torch.Tensor], torch.Tensor] | None = None, tokens: int = 8,
                      atol: float = 1e-4) -> None:
    """Raise if `head` (default `output_head(model)`) does not reproduce the model's own logits.

    One short forward pass: a guard for model families whose logit post-processing is unknown here.
    """
    head = head or output_head(model)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(tokens, device=device) * 7919 % max(vocab - 1, 1)).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        output = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    expected = output.logits.float()
    got = head(output.hidden_states[-1]).float()
    if not torch.allclose(got, expected, atol=atol, rtol=1e-4):
        gap = (got - expected).abs().max().item()
        raise RuntimeError(
            f"output_head: applying the LM head to the final hidden states of {type(model).__name__} does not give "
            f"the model's logits (max difference {gap:.3g}); this family post-processes its logits in a way "
            "opsdlab does not know yet (see models.output_head)."
        )


def final_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """Final (post-norm) hidden states without materializing full-vocabulary logits.

    The model's own forward runs (so DDP's gradient hooks and accelerate's autocast apply) with the LM
    head on no position (`logits_to_keep=1`, then a pre-hook empties the head's input), and the
    backbone's `last_hidden_state` is taken from a forward hook: no per-layer hidden states are kept
    or, under mixed precision, copied to float32. A padded batch runs without a tokens x tokens attention mask
    (`padding.left_aligned`). A model whose backbone is not found returns every layer's hidden states instead,
    and the last is used.
    """
    backbone = decoder_stack(model)
    captured = []
    handles = []
    if backbone is not None:
        handles.append(backbone.register_forward_hook(
            lambda module, args, output: captured.append(
                output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None))))
        head = head_module(model)
        if head is not None:
            # The forward's own logits are never read: the head gets zero positions. Its one kept position
            # is a strided slice of the hidden states, and with gradients on torch's matmul multiplies such
            # a slice by a batch-expanded copy of the head weight (rows x the whole vocabulary x hidden):
            # at Qwen3's vocabulary that copy cost more CPU time than the rest of the OPSD step.
            handles.append(head.register_forward_pre_hook(
                lambda module, args: (args[0][..., :0, :], *args[1:]) if args and torch.is_tensor(args[0]) else None))
    try:
        with left_aligned(model):  # no tokens x tokens attention mask for a padded batch
            output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False,
                           output_hidden_states=backbone is None)
    finally:
        for handle in handles:
            handle.remove()
    if backbone is None:
        return output.hidden_states[-1]
    if len(captured) != 1 or not torch.is_tensor(captured[0]) or captured[0].shape[:2] != input_ids.shape:
        raise RuntimeError(f"final_hidden: the backbone ({type(backbone).__name__}) of {type(model).__name__} "
                           "did not give one last_hidden_state of the input's shape during the forward; "
                           "the OPSD loss cannot read this model's final hidden states")
    return captured[0]
