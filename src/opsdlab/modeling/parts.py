"""The parts of a causal LM that the losses reach past its forward for, found under any wrapper (DDP,
DeepSpeed, torch.compile, PEFT): its decoder stack and its LM head."""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model


def decoder_stack(model) -> torch.nn.Module | None:
    """The decoder stack whose output's `last_hidden_state` is the final (post-norm) hidden state.

    Looked up, as TRL's distillation trainer does, as the transformers model's `base_model` under any
    DDP/DeepSpeed/compile and PEFT wrapper; None when the model has no separate backbone.
    """
    inner = extract_model_from_parallel(model)
    if is_peft_model(inner):
        inner = inner.get_base_model()
    backbone = getattr(inner, "base_model", None)
    return backbone if isinstance(backbone, torch.nn.Module) and backbone is not inner else None


def head_module(model) -> torch.nn.Module | None:
    """The LM head module (`get_output_embeddings()`) under any DDP/DeepSpeed/compile and PEFT wrapper."""
    inner = extract_model_from_parallel(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None
