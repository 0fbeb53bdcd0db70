"""Models and tokenizers in and out as Hugging Face folders, and the tiny offline default.

Every stage calls `load_policy(folder)` and `save_policy(model, tokenizer, folder)`, whether the
folder holds the tiny model built here or a real Qwen3-style thinking model. The tiny default is a
standard `Qwen3ForCausalLM` with random weights and a word-level tokenizer trained in-process with
the `tokenizers` library, wrapped as `PreTrainedTokenizerFast`, whose chat template takes a
per-call `enable_thinking` switch like Qwen3's. Weights are read from safetensors only, and remote
code stays off unless asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, UNK_TOKEN]
# <think> and </think> are ordinary added tokens, as in Qwen3: they survive skip_special_tokens.
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


class ModelFolderError(ValueError):
    """A model folder that cannot be used, with what is wrong and how to fix it."""


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
    "small": TinySize(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=576),
}


def build_tiny_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `corpus`: whole numbers, words and punctuation are tokens.

    Spaces are folded into the following token (Metaspace), so decoding restores the text
    exactly and `\\boxed{18}` round-trips for the answer verifier.
    """
    core = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\\boxed\{| ?\d+| ?[^\w\s]|\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS + ADDED_TOKENS, min_frequency=1)
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=TinySize().max_position_embeddings,
    )
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3ForCausalLM sized by `TINY_SIZES[size]`, with tied embeddings."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(TINY_SIZES)}")
    dims = TINY_SIZES[size]
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_key_value_heads,
        head_dim=dims.hidden_size // dims.num_attention_heads,
        max_position_embeddings=dims.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
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
    config_path = folder / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.exists() else None
    try:
        if declared == "PreTrainedTokenizerFast":
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"model folder {folder}: cannot load its tokenizer ({error})") from error
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
    """Load a causal LM from a Hugging Face folder, safetensors only."""
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


def thinking_token_count(token_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens strictly between <think> and </think> in a response (0 without a think block).

    An unclosed think block (a truncated response) counts to the end.
    """
    open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    if open_id is None or open_id == tokenizer.unk_token_id or open_id not in token_ids:
        return 0
    start = token_ids.index(open_id) + 1
    end = token_ids.index(close_id, start) if close_id in token_ids[start:] else len(token_ids)
    return end - start
