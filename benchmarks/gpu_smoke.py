"""GPU smoke run: every stage and the pipeline for a few steps on CUDA, then OPSD under accelerate
with DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP configs on the GPUs present. Never part of the tests.

    python benchmarks/gpu_smoke.py [--out benchmarks/results/gpu_smoke.json] [--processes 1]

Builds the tiny offline model, runs each command with a time limit, and prints and writes what ran:
the command, its exit code, its wall time and the tail of its output when it failed. The DeepSpeed
runs are reported as skipped when the `deepspeed` package is not importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "src" / "opsdlab" / "configs" / "accelerate"
FEW = ["--set", "max_steps=3", "--set", "save_steps=2", "--set", "logging_steps=1"]


def _run(name: str, command: list[str], env: dict, timeout: int) -> dict:
    start = time.time()
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code, output = "timeout", str(error.stdout or "") + str(error.stderr or "")
    record = {"name": name, "command": " ".join(command), "returncode": code,
              "seconds": round(time.time() - start, 1)}
    if code != 0:
        record["output_tail"] = output[-3000:]
    print(f"[{'ok' if code == 0 else 'FAIL'}] {name}: {record['seconds']} s", flush=True)
    if code != 0:
        print(record["output_tail"], flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_smoke.json"))
    parser.add_argument("--work", default="/tmp/opsdlab-gpu-smoke")
    parser.add_argument("--processes", type=int, default=None, help="accelerate processes (default: GPU count)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per command")
    parser.add_argument("--only", default=None,
                        help="comma-separated name prefixes to run (sft and rlvr feed the later steps)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine")
        return 1
    processes = args.processes or torch.cuda.device_count()
    work = Path(args.work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "opsdlab.cli"]
    records = [{"name": "device", "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                "torch": torch.__version__}]
    steps = [
        ("sft", cli + ["sft", "--model", "tiny", "--out", f"{work}/sft", *FEW, "--set", "rows=256"]),
        ("rlvr", cli + ["rlvr", "--model", f"{work}/sft/model", "--out", f"{work}/rlvr", *FEW,
                        "--set", "dynamic_sampling=true"]),
        ("opsd frozen", cli + ["opsd", "--model", f"{work}/rlvr/model", "--out", f"{work}/opsd-frozen", "--gate",
                               "all", "--teacher-check", "20", *FEW]),
        ("opsd bf16 weights", cli + ["opsd", "--model", f"{work}/rlvr/model", "--out", f"{work}/opsd-bf16", "--gate",
                                     "all", "--teacher-check", "0", "--dtype", "bfloat16", *FEW]),
        ("opsd ema, killed at step 2 and resumed", "RESUME"),
        ("opsd lora", cli + ["opsd", "--model", f"{work}/rlvr/model", "--out", f"{work}/opsd-lora", "--gate", "all",
                             "--teacher-check", "0", *FEW, "--set", "lora_r=8"]),
        ("eval", cli + ["eval", "--model", f"{work}/opsd-frozen/model", "--out", f"{work}/eval", "--problems", "32"]),
        ("pipeline", cli + ["pipeline", "--config", "tiny", f"run_dir={work}/pipeline", "sft.max_steps=20",
                            "rlvr.max_steps=3", "opsd.max_steps=3", "eval.problems=32"]),
    ]
    for config in ("ddp", "zero2", "zero3", "fsdp"):
        name = f"accelerate {config}: opsd frozen"
        if config.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
            records.append({"name": name, "returncode": "skipped", "reason": "deepspeed is not installed"})
            print(f"[skip] {name}: deepspeed is not installed")
            continue
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", str(processes)]
        steps.append((name, launch + ["-m", "opsdlab.cli", "opsd", "--model", f"{work}/rlvr/model", "--out",
                                      f"{work}/opsd-{config}", "--gate", "correct", "--teacher-check", "0", *FEW]))
    if args.only:
        steps = [(name, command) for name, command in steps
                 if any(name.startswith(prefix.strip()) for prefix in args.only.split(","))]
    for name, command in steps:
        if command == "RESUME":
            base = cli + ["opsd", "--model", f"{work}/rlvr/model", "--out", f"{work}/opsd-ema", "--gate", "all",
                          "--teacher-check", "0", "--set", "teacher_weights=ema", "--set", "save_steps=2",
                          "--set", "logging_steps=1"]
            records.append(_run(name + " (first 2 steps)", base + ["--set", "max_steps=2"], env, args.timeout))
            records.append(_run(name + " (resume to 4)", base + ["--set", "max_steps=4"], env, args.timeout))
            continue
        records.append(_run(name, command, env, args.timeout))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=2))
    failed = [r["name"] for r in records if r.get("returncode") not in (0, "skipped", None)]
    print(f"{len(records) - 1 - len(failed)} ran or skipped, {len(failed)} failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
