"""Time the demo's SFT step on the tiny task: the default against the levers that would make it cheaper.

    python benchmarks/sft_step_time.py [--steps 40] [--threads 1,2] [--variants 0,3] [--sizes tiny,shallow] [--out FILE]

SFT is most of the demo's wall time (README, "Where the demo's time goes"). Each variant trains a
fresh copy of the tiny base model for `--steps` SFT steps on the demo's rows (TRL's SFTTrainer, as
the pipeline runs it) and records the wall time of every optimizer step; the median of the steps
after the first five is the figure. The variants change how rows are batched or how the model runs,
not the data: the preset's batching (random rows, `sft.batch_size` per step; each result records
it), length-grouped batches (`sft.batching: length_grouped`, transformers' LengthGroupedSampler,
which cuts padding), 64 rows per step, the model under `torch.compile` (inductor, dynamic shapes;
its first step includes the compilation), and each step's random rows split by length into 2 or 4
micro-batches (`sft.batching: rebalanced`). `--sizes` repeats every variant per offline model size
(`model.size`, models.TINY_SIZES).
This measures speed only: whether a variant trains as good a model in fewer seconds is a question
for the pipeline over seeds. Results, with the machine and the load average, go to
benchmarks/results/sft_step_time.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sft_step_time.json"

# Name -> changes to the demo's SFTStageConfig.
VARIANTS = {
    "default: random rows": {},
    "length-grouped batches": {"batching": "length_grouped"},
    "64 random rows per step": {"batch_size": 64},
    "torch.compile (dynamic shapes), random rows": {"compile": True},
    "random rows in 2 length-balanced micro-batches": {"batching": "rebalanced", "gradient_accumulation_steps": 2},
    "random rows in 4 length-balanced micro-batches": {"batching": "rebalanced", "gradient_accumulation_steps": 4},
}


def step_seconds(base_model: Path, rows: list[dict], stage, out_dir: Path, compile_model: bool = False) -> list[float]:
    """Wall time of every optimizer step of one SFT run (the first compiled step includes compilation)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.sft import sft_args

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    model, tokenizer = load_policy(base_model, "float32", False)
    if compile_model:
        model.compile(dynamic=True)
    args = sft_args(stage, out_dir, seed=0, eos_token=tokenizer.eos_token)
    clock = StepClock()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]).train()
    return clock.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", default="1,2", help="torch CPU thread counts to try, comma-separated")
    parser.add_argument("--variants", default=None,
                        help="comma-separated indices into VARIANTS (default: all), e.g. 0,3")
    parser.add_argument("--sizes", default="tiny", help="offline model sizes to time, comma-separated")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import torch

    from opsdlab.config import load_config
    from opsdlab.modeling.models import load_policy
    from opsdlab.run.train_steps import prepare_base
    from opsdlab.tasks import build_task

    chosen = list(VARIANTS.items())
    if args.variants:
        chosen = [chosen[int(i)] for i in args.variants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        load_before = os.getloadavg()
        results, rows = [], None
        for size in args.sizes.split(","):
            config = load_config("tiny", [f"run_dir={tmp}/{size}", f"model.size={size}"])
            task = build_task(config.task.name, config.task.options, seed=config.seed)
            base = prepare_base(Path(config.run_dir), config, task)
            if rows is None:  # every size shares the task's tokenizer, so the rows are the same
                _, tokenizer = load_policy(base, "float32", False)
                rows = task.sft_rows(tokenizer, config.sft.rows, thinking=config.task.thinking, seed=config.seed)
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                for name, changes in chosen:
                    changes = dict(changes)
                    compile_model = changes.pop("compile", False)
                    stage = replace(config.sft, max_steps=args.steps, save_steps=10 * args.steps,
                                    logging_steps=10 * args.steps, **changes)
                    times = step_seconds(base, rows, stage, Path(tmp) / f"sft-{len(results)}", compile_model)
                    median = statistics.median(times[5:] or times)
                    results.append({"variant": name, "model_size": size, "batch_size": stage.batch_size,
                                    "threads": threads, "steps": len(times),
                                    "median_step_seconds": round(median, 4), "first_step_seconds": round(times[0], 2),
                                    "rows_per_second": round(stage.batch_size / median, 1)})
                    print(f"{size}, {threads} thread(s), {name}: {median:.3f} s/step, "
                          f"{stage.batch_size / median:.0f} rows/s", flush=True)

    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/sft_step_time.py " + f"--steps {args.steps} --threads {args.threads}"
                         + (f" --variants {args.variants}" if args.variants else "") + f" --sizes {args.sizes}",
              "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
