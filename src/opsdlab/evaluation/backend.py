"""What an evaluation backend is: how it loads, samples and continues responses, and what it returns.

Both backends (`evaluate.BACKENDS`: transformers' `model.generate`, and vLLM in `vllm_backend`) return
the same `Generation` records, so grading, lengths and the written files do not depend on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Generation:
    """One response: its ids (with the closing EOS, if it ended), their text, and whether it hit the
    length cap. `forced` is, for a budget-forced response, the [start, end) slice of `token_ids` that
    holds the forced text (think-close and answer cue); None otherwise."""

    token_ids: list[int]
    text: str
    truncated: bool
    forced: tuple[int, int] | None = None


@dataclass(frozen=True)
class Backend:
    """How an evaluation gets its responses.

    load(model_dir, dtype, trust_remote_code, settings, seed) -> (engine, tokenizer);
    generate(engine, tokenizer, prompts, sampling, desc) -> k Generations per prompt, prompt-major;
    extend(engine, tokenizer, token_ids, sampling, rows, desc) -> one Generation per row of prompt ids
    (`sampling.k` is ignored), where `rows` numbers each row among the evaluation's samples (vLLM seeds
    each row by it). Budget forcing continues cut responses with `extend`.
    entropy(engine, tokenizer, prompts, generations) -> per generation, the model's mean next-token
    entropy over the positions that predicted its ids (None for an empty one); None where the backend
    cannot compute it (vLLM returns only the top logprobs, not the whole distribution).
    """

    load: Callable
    generate: Callable
    extend: Callable
    entropy: Callable | None = None
