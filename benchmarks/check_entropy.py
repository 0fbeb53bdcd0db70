"""What a held-out check's token entropy costs: the responses scored one at a time against several at a
time (`evaluate.ENTROPY_BATCH_TOKENS`, right-padded, no attention mask), on the same responses, in
alternating order.

    python benchmarks/check_entropy.py --json benchmarks/results/check_entropy_cpu.json [--model DIR]

Samples `--responses` responses of at most `--max-new-tokens` tokens from the tiny offline model (or a
model folder), then times `evaluate._entropy_transformers` `--repeats` times per path and records the
median seconds, their ratio and the largest difference of the per-response entropies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation import evaluate as evaluation
from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, load_policy
from opsdlab.tasks import build_task
from opsdlab.tasks.prompts import render_prompt


def timed(model, tokenizer, prompts, generations, batch_tokens: int) -> tuple[float, list]:
    default = evaluation.ENTROPY_BATCH_TOKENS
    evaluation.ENTROPY_BATCH_TOKENS = batch_tokens
    try:
        start = time.perf_counter()
        values = evaluation._entropy_transformers(model, tokenizer, prompts, generations)
        return time.perf_counter() - start, values
    finally:
        evaluation.ENTROPY_BATCH_TOKENS = default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", default=None, help="a model folder (default: the tiny offline model)")
    parser.add_argument("--responses", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    task = build_task("synthetic")
    if args.model:
        model, tokenizer = load_policy(args.model)
    else:
        tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
        model = build_tiny_model(tokenizer)
    prompts = [render_prompt(tokenizer, example, thinking=True) for example in task.examples("test", args.responses)]
    generations = evaluation.generate(model, tokenizer, prompts, SamplingConfig(
        k=1, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0))
    paths = {"one_at_a_time": 1, "batched": evaluation.ENTROPY_BATCH_TOKENS}
    seconds = {name: [] for name in paths}
    values = {}
    for repeat in range(args.repeats):
        for name in (list(paths) if repeat % 2 == 0 else list(paths)[::-1]):
            wall, values[name] = timed(model, tokenizer, prompts, generations, paths[name])
            seconds[name].append(round(wall, 4))
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    gap = max(abs(a - b) for a, b in zip(values["one_at_a_time"], values["batched"]) if a is not None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": commit, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                            "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
              "model": args.model or "tiny", "responses": len(generations),
              "mean_response_tokens": statistics.mean(len(g.token_ids) for g in generations),
              "batch_tokens": evaluation.ENTROPY_BATCH_TOKENS, "seconds": seconds,
              "median_seconds": {k: round(v, 4) for k, v in medians.items()},
              "ratio_batched_over_one_at_a_time": round(medians["batched"] / medians["one_at_a_time"], 3),
              "max_entropy_gap": gap}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"one at a time {medians['one_at_a_time']:.3f} s, batched {medians['batched']:.3f} s "
          f"(x{result['ratio_batched_over_one_at_a_time']}); largest entropy gap {gap:.2g}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
