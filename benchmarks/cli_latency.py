"""Time what a user waits for before the first line: a config error, `config show` and `plan`.

    python benchmarks/cli_latency.py [--repeats 5] [--json out.json]

Each command runs `--repeats` times in a fresh interpreter (`python -m opsdlab.cli ...`); the result
is the median and the range of the wall times, and whether the command imported torch (read from
`python -X importtime`'s log of one extra run). Validation and `config show` import only the config
layer, and so does `plan`, so none should wait for torch, transformers, TRL or vLLM. The load average before and
after is recorded: timings under load are upper bounds.
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

COMMANDS = {
    "pipeline_bad_value": ["pipeline", "--config", "tiny", "opsd.max_steps=abc"],
    "demo_bad_value": ["demo", "opsd.learning_rate=-1"],
    "config_show": ["config", "show", "qwen3-1.7b"],
    "plan": ["plan", "qwen3-8b"],
    "help": ["--help"],
}
HEAVY = ("torch", "transformers", "trl", "vllm")


def timed(arguments: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "opsdlab.cli", *arguments], capture_output=True, text=True)
    return time.perf_counter() - start, result.returncode


def heavy_imports(arguments: list[str]) -> list[str]:
    """The heavy packages a command imports (from `-X importtime`, which logs every import)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "opsdlab.cli", *arguments],
                            capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    return sorted(imported & set(HEAVY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = {}
    for name, arguments in COMMANDS.items():
        runs = [timed(arguments) for _ in range(args.repeats)]
        seconds = [wall for wall, _ in runs]
        results[name] = {"command": "opsdlab " + " ".join(arguments), "exit_codes": sorted({code for _, code in runs}),
                         "median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
                         "max_s": round(max(seconds), 3), "heavy_imports": heavy_imports(arguments)}
        print(f"{name:20s} median {results[name]['median_s']:.2f} s  [{results[name]['min_s']:.2f}, "
              f"{results[name]['max_s']:.2f}]  heavy imports: {results[name]['heavy_imports'] or 'none'}")
    record = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "repeats": args.repeats, "load_before": load_before, "load_after": os.getloadavg(), "commands": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
