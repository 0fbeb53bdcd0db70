"""Evaluation throughput of the two backends (transformers, vLLM) on one model, in one run.

    python benchmarks/eval_throughput.py [--model DIR] [--problems 64] [--k 4] [--max-new-tokens 192]
        [--in-process] [--out benchmarks/results/eval_throughput_cpu.json]

Without --model it builds the tiny offline model (random init, so most responses run to
--max-new-tokens). Each backend is loaded, warmed up on two problems, then times `evaluate.evaluate`
on the same problems with the same sampling settings: samples per second and generated tokens per
second (response tokens, EOS not counted), plus the load time. Writes JSON with the machine
description. Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """What the numbers were measured on."""
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "load_average_at_start": os.getloadavg(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def tiny_model(folder: Path) -> Path:
    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, save_policy
    from opsdlab.tasks import build_task

    tokenizer = build_tiny_tokenizer(build_task("synthetic", {}).tokenizer_corpus())
    return save_policy(build_tiny_model(tokenizer, seed=0), tokenizer, folder)


def measure(backend: str, model_dir: Path, examples, sampling, dtype: str, settings=None) -> dict:
    """Load `backend`, warm it up, and time one evaluation of `examples`."""
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.evaluation.evaluate import evaluate, load_for_eval
    from opsdlab.tasks.verifier import VerifierConfig

    verifier = VerifierConfig(compare="exact")
    start = time.perf_counter()
    engine, tokenizer = load_for_eval(model_dir, backend, dtype, settings=settings, seed=sampling.seed)
    load_seconds = time.perf_counter() - start
    warm = SamplingConfig(k=1, temperature=sampling.temperature or 1.0, max_new_tokens=8)
    evaluate(engine, tokenizer, examples[:2], verifier, warm, backend=backend)
    start = time.perf_counter()
    samples, summary = evaluate(engine, tokenizer, examples, verifier, sampling, backend=backend)
    seconds = time.perf_counter() - start
    tokens = sum(s.response_tokens for s in samples)
    if backend == "vllm":
        engine.llm_engine.engine_core.shutdown()
    return {"backend": backend, "load_seconds": round(load_seconds, 2), "eval_seconds": round(seconds, 2),
            "samples": len(samples), "generated_tokens": tokens,
            "samples_per_second": round(len(samples) / seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
            "mean_response_tokens": summary["mean_response_tokens"], "truncation_rate": summary["truncation_rate"]}


def run(model_dir: Path, problems: int, sampling, dtype: str, settings,
        backends: tuple[str, ...] = ("transformers", "vllm")) -> list[dict]:
    from opsdlab.tasks import build_task

    examples = build_task("synthetic", {}).examples("test", problems)
    results = []
    for backend in backends:
        result = measure(backend, model_dir, examples, sampling, dtype, settings if backend == "vllm" else None)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the tiny offline model)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64, help="transformers backend: prompts per batch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--in-process", action="store_true", help="vLLM engine in this process (see VLLMSettings)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_throughput_cpu.json"))
    args = parser.parse_args()

    from opsdlab.config.sections import SamplingConfig, VLLMSettings

    sampling = SamplingConfig(k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)
    settings = VLLMSettings(gpu_memory_utilization=args.gpu_memory_utilization, in_process=args.in_process)
    described = machine()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_model(Path(tmp) / "model")
        results = run(model_dir, args.problems, sampling, args.dtype, settings)
    record = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": described, "model": args.model or "tiny (random init)", "problems": args.problems,
              "sampling": asdict(sampling), "dtype": args.dtype, "vllm_settings": asdict(settings),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    sys.exit(main())
