"""Seconds per OPSD step and per GRPO step, with vLLM colocated generation (default) or transformers'
`generate`, on a model of the shape of Qwen3-1.7B (random init from its config: no download), plus eval
throughput of the backends in use. Never part of the tests.

    python benchmarks/gpu_step_bench.py [--steps 3] [--completion 4096] [--out benchmarks/results/gpu_step_bench.json]
    python benchmarks/gpu_step_bench.py --generation transformers   # where vLLM is not installed
    python benchmarks/gpu_step_bench.py --tiny    # the same code path on CPU with tiny sizes (a dry run)

Both stages train on the same batch (the same prompts, `--prompts` x `--rollouts` rollouts of up to
`--completion` tokens per step; a random model rarely stops early, so completions run to the limit)
with TRL's `use_vllm` in colocate mode, or TRL's transformers generation with `--generation transformers`.
Each measurement runs in its own process, so that GPU memory and its peak belong to one stage. Reported
per stage: seconds per step (median over the steps after the first, which includes compilation and
warm-up), rollout generation seconds and generated tokens per second, peak GPU memory allocated by torch
(training and a vLLM engine share the process) and device memory in use at the end. Then eval
throughput of the backends in use (`eval_throughput.py`) on the same model folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Qwen3-1.7B's config.json (architecture only).
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)


def build_model(folder: Path, tiny: bool) -> Path:
    """A random-init Qwen3 of the chosen shape and the project's tokenizer, padded to its vocabulary."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsdlab.modeling.models import build_tiny_tokenizer, save_policy
    from opsdlab.tasks import build_task

    tokenizer = build_tiny_tokenizer(build_task("synthetic", {}).tokenizer_corpus())
    shape = dict(TINY, vocab_size=len(tokenizer)) if tiny else dict(QWEN3_1_7B)
    # Every id the model can sample decodes to a token (vLLM detokenizes each one).
    tokenizer.add_tokens([f"<v{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    tokenizer.model_max_length = shape["max_position_embeddings"]
    config = Qwen3Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    if not tiny:
        model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_policy(model, tokenizer, folder)


def stage_config(stage: str, args):
    """The OPSD or RLVR (GRPO) stage config of one measurement: same batch, same generation."""
    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig

    common = dict(max_steps=args.steps, prompts_per_step=args.prompts, max_completion_length=args.completion,
                  gradient_accumulation_steps=args.accumulation, gradient_checkpointing=not args.tiny,
                  save_steps=10**6, logging_steps=1, use_vllm=args.generation == "vllm", vllm_mode="colocate",
                  vllm_gpu_memory_utilization=args.vllm_memory, vllm_max_model_length=args.completion + 512)
    if stage == "opsd":
        return OPSDStageConfig(**common, rollouts_per_prompt=args.rollouts, gate="all", min_kept_rollouts=0)
    return RLVRStageConfig(**common, group_size=args.rollouts)


def measure_stage(stage: str, model_dir: Path, args) -> dict:
    """Train `stage` for args.steps steps and time each one (run in a fresh process)."""
    import torch
    from transformers import TrainerCallback

    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.opsd import OPSDTrainer, opsd_args
    from opsdlab.loss.rewards import VerifierReward
    from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset
    from opsdlab.tasks import build_task
    from opsdlab.tasks.verifier import VerifierConfig

    cuda = torch.cuda.is_available()
    model, tokenizer = load_policy(model_dir, "bfloat16" if cuda else "float32")
    config = stage_config(stage, args)
    task = build_task("synthetic", {})
    dataset = rl_dataset(task.examples("train", args.prompts * (args.steps + 1)), tokenizer, True)
    reward = [VerifierReward(VerifierConfig(compare="exact"), {tokenizer.eos_token_id, tokenizer.pad_token_id})]
    work = Path(args.work) / stage
    step_seconds: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - self.start)

    if stage == "opsd":
        trainer = OPSDTrainer(model=model, reward_funcs=reward, args=opsd_args(config, work, 0), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()], opsd=config, student_thinking=True)
    else:
        trainer = RLVRTrainer(model=model, reward_funcs=reward, args=grpo_args(config, work, 0), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
    generation = {"seconds": [], "tokens": []}
    generate = trainer._generate  # TRL's rollout generation, either backend; returns (prompt_ids, completion_ids, ...)

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        generation["seconds"].append(time.perf_counter() - start)
        generation["tokens"].append(sum(len(ids) for ids in out[1]))
        return out

    trainer._generate = timed_generate
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = step_seconds[1:] or step_seconds
    result = {"stage": "grpo" if stage == "rlvr" else stage, "steps": len(step_seconds),
              "seconds_per_step": round(statistics.median(measured), 2),
              "step_seconds": [round(s, 2) for s in step_seconds],
              "rollouts_per_step": args.prompts * args.rollouts,
              "generated_tokens_per_step": generation["tokens"],
              "generation_seconds": [round(s, 2) for s in generation["seconds"]],
              "generated_tokens_per_second": round(sum(generation["tokens"][1:] or generation["tokens"])
                                                   / sum(generation["seconds"][1:] or generation["seconds"]), 1)}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(peak_torch_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      device_in_use_at_end_gib=round((total - free) / 2**30, 2))
    return result


def _child(what: str, model_dir: Path, args, out: Path) -> dict:
    """Run one measurement in a fresh process; its JSON result, or the error it printed."""
    command = [sys.executable, __file__, "--child", what, "--model-dir", str(model_dir), "--child-out", str(out),
               *args.forward]
    print("$ " + " ".join(command), flush=True)
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as error:
        tail = (str(error.stdout or "") + str(error.stderr or ""))[-3000:]
        return {"stage": what, "returncode": "timeout", "timeout_seconds": args.timeout, "output_tail": tail}
    if result.returncode != 0 or not out.exists():
        tail = (result.stdout + result.stderr)[-3000:]
        print(tail, flush=True)
        return {"stage": what, "returncode": result.returncode, "output_tail": tail}
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a CPU dry run of the code path")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (first is warm-up)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step")
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per prompt (OPSD) = group size (GRPO)")
    parser.add_argument("--completion", type=int, default=None, help="max completion tokens")
    parser.add_argument("--accumulation", type=int, default=None, help="gradient accumulation steps")
    parser.add_argument("--generation", choices=("vllm", "transformers"), default="vllm",
                        help="rollout backend of both stages (TRL use_vllm colocate, or transformers generate)")
    parser.add_argument("--vllm-memory", type=float, default=0.3, help="vllm_gpu_memory_utilization")
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--stages", default="opsd,rlvr,eval",
                        help="comma-separated measurements to run, of opsd, rlvr (GRPO) and eval")
    parser.add_argument("--work", default="/tmp/opsdlab-gpu-step-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=("opsd", "rlvr", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = dict(steps=2, prompts=2, rollouts=2, completion=16, accumulation=1, eval_problems=4) if args.tiny else \
        dict(steps=3, prompts=8, rollouts=4, completion=4096, accumulation=16, eval_problems=16)
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.forward = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in sizes] + \
        [f"--vllm-memory={args.vllm_memory}", f"--work={args.work}", f"--generation={args.generation}"] + \
        (["--tiny"] if args.tiny else [])

    if args.child:
        if args.child == "eval":
            from eval_throughput import run

            from opsdlab.config.sections import SamplingConfig, VLLMSettings

            sampling = SamplingConfig(k=4, temperature=0.6, max_new_tokens=args.completion, batch_size=64)
            dtype = "float32" if args.tiny else "bfloat16"
            result = {"stage": "eval", "problems": args.eval_problems, "k": 4, "max_new_tokens": args.completion,
                      "dtype": dtype, "backends": run(Path(args.model_dir), args.eval_problems, sampling, dtype,
                                                      VLLMSettings(gpu_memory_utilization=0.5, in_process=args.tiny),
                                                      backends=("transformers", "vllm") if args.generation == "vllm"
                                                      else ("transformers",))}
        else:
            result = measure_stage(args.child, Path(args.model_dir), args)
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if not stages or set(stages) - {"opsd", "rlvr", "eval"}:
        parser.error(f"--stages: expected a comma-separated subset of opsd,rlvr,eval, got {args.stages!r}")

    import torch

    from eval_throughput import machine

    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: this benchmark is for a GPU machine (use --tiny for a CPU dry run)")
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    described = machine()
    start = time.perf_counter()
    model_dir = build_model(work / "model", args.tiny)
    print(f"model folder {model_dir}: {time.perf_counter() - start:.1f} s", flush=True)
    results = [_child(what, model_dir, args, work / f"{what}.json") for what in stages]
    for result in results:
        print(json.dumps(result), flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("gpu_step_bench_tiny_cpu.json" if args.tiny
                                                               else "gpu_step_bench.json"))
    record = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": described, "model": "tiny" if args.tiny else "Qwen3-1.7B shape, random init",
              "sizes": {k: getattr(args, k) for k in sizes}, "generation": args.generation,
              "vllm_gpu_memory_utilization": args.vllm_memory,
              "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0 if all("returncode" not in r for r in results) else 1


if __name__ == "__main__":  # vLLM spawns worker processes that import this module
    sys.exit(main())
