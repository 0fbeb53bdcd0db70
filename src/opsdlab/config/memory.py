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
