"""Rollout generation throughput of TRL's trainer: `model.generate` vs transformers' continuous batching.

    python benchmarks/generation_backends.py [--model DIR] [--prompts 16] [--max-completion-length 64]
        [--rounds 3] [--out benchmarks/results/generation_backends_cpu.json]

Builds one RLVR trainer per generation backend (`config.choices.GENERATION_BACKENDS`: "transformers" and
"paged"; `grpo_args` sets GRPOConfig's switches) on the same model weights, and times the trainer's
own rollout generation (`GRPOTrainer._generate_single_turn`) on the same prompt token ids, the
stage's sampling settings. One warm-up call per backend, then `--rounds` measured rounds, the two
backends alternating which goes first, so that load from other work on a shared machine falls on
both alike. Tokens are response tokens as TRL returns them (up to and including EOS). Without
--model it builds the tiny offline model (random init). Writes JSON with the machine description
(`eval_throughput.machine`). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

BACKENDS = ("transformers", "paged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the tiny offline model)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_backends_cpu.json"))
    args = parser.parse_args()

    import torch

    from eval_throughput import machine, tiny_model
    from opsdlab.modeling.models import load_policy
    from opsdlab.config.stages import RLVRStageConfig
    from opsdlab.stages.rlvr import RLVRTrainer, grpo_args, rl_dataset
    from opsdlab.tasks import build_task

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="generation-backends-"))
    model_dir = Path(args.model) if args.model else tiny_model(work / "tiny")
    examples = build_task("synthetic", {}).examples("train", args.prompts)

    def zero_reward(completions, **_):
        return [0.0] * len(completions)

    trainers = {}
    for backend in BACKENDS:
        model, tokenizer = load_policy(model_dir)
        config = RLVRStageConfig(max_steps=1, prompts_per_step=args.prompts, group_size=2,
                                 max_completion_length=args.max_completion_length, generation_backend=backend)
        trainers[backend] = RLVRTrainer(
            model=model, reward_funcs=[zero_reward], args=grpo_args(config, work / backend, 0, num_processes=1),
            train_dataset=rl_dataset(examples, tokenizer, True), processing_class=tokenizer)
    any_trainer = trainers[BACKENDS[0]]
    prompts = [row["prompt"] for row in any_trainer.train_dataset]
    prompt_ids, _, _ = any_trainer._tokenize_prompts(prompts)

    def run(backend: str) -> dict:
        torch.manual_seed(0)
        start = time.perf_counter()
        completion_ids, _ = trainers[backend]._generate_single_turn(prompt_ids, None, {}, 1)
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in completion_ids)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}

    warmup = {backend: run(backend) for backend in BACKENDS}
    rounds = []
    for index in range(args.rounds):
        order = BACKENDS if index % 2 == 0 else BACKENDS[::-1]
        rounds.append({"order": list(order), **{backend: run(backend) for backend in order}})
        print(f"round {index + 1}: " + "  ".join(f"{b} {rounds[-1][b]['tokens_per_s']:.1f} tok/s" for b in BACKENDS))
    summary = {backend: {"median_tokens_per_s": statistics.median(r[backend]["tokens_per_s"] for r in rounds),
                         "min_tokens_per_s": min(r[backend]["tokens_per_s"] for r in rounds),
                         "max_tokens_per_s": max(r[backend]["tokens_per_s"] for r in rounds)}
               for backend in BACKENDS}
    result = {"machine": info, "model": str(args.model or "tiny offline model (random init)"),
              "prompts": args.prompts, "max_completion_length": args.max_completion_length,
              "paged_config": trainers["paged"].args.transformers_continuous_batching_config,
              "warmup": warmup, "rounds": rounds, "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
