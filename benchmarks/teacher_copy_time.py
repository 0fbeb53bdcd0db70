"""Seconds to build the frozen/EMA teacher copy (`teacher.separate_copy`) of a random-init model.

    python benchmarks/teacher_copy_time.py [--shape qwen3-1.7b] [--threads 1,2] [--out FILE]

The copy is a fresh network of the student's config whose weights are then overwritten by the
student's; its random initialisation is wasted work, single-threaded on CPU. The copy is built on the
student's device, so on a GPU that work is instant; on CPU (where the student lives here) it is the
figure this records, next to the bare `from_config` that the copy's time is made of. Results go to
benchmarks/results/teacher_copy_time.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from gpu_step_bench import QWEN3_1_7B, TINY

SHAPES = {"qwen3-1.7b": QWEN3_1_7B, "tiny": dict(TINY, vocab_size=151936)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_copy_time.json"))
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, Qwen3Config

    from opsdlab.stages.teacher import separate_copy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen3Config(**SHAPES[args.shape])
    student = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    accelerator = Accelerator(cpu=device == "cpu")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        bare = time.perf_counter() - start
        start = time.perf_counter()
        teacher = separate_copy(student, accelerator)
        if device == "cuda":
            torch.cuda.synchronize()
        copy_seconds = time.perf_counter() - start
        del teacher
        results.append({"threads": threads, "from_config_on_cpu_seconds": round(bare, 1),
                        "separate_copy_seconds": round(copy_seconds, 1)})
        print(json.dumps(results[-1]), flush=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": f"python benchmarks/teacher_copy_time.py --shape {args.shape} --threads {args.threads}",
              "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "shape": args.shape,
              "parameters": sum(p.numel() for p in student.parameters()), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
