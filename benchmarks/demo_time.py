"""Time the demo: run `opsdlab demo` (the tiny preset) in a fresh run directory and write per-stage seconds.

    python benchmarks/demo_time.py [--threads N] [--run-dir DIR] [key=value ...]

Every line the pipeline logs to summary.jsonl (a finished stage or evaluation) carries its own
seconds (lines without them are timed from the line before), so each stage's entry is its training
time and each evaluation's its own time, with the peak memory of the process that wrote it
(`peak_rss_mb`; a worker's is its step's); `report` is the report build. The result, with the
machine, the torch threads, the largest peak of any one process and the load average before and
after (timings under load are upper bounds), goes to benchmarks/results/demo_time.json.
Extra `key=value` arguments are pipeline overrides, as for `opsdlab demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "demo_time.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def item_name(record: dict) -> str:
    if record.get("kind") == "eval":
        return f"eval {record['checkpoint']}/{record['set']}"
    if record.get("kind") == "stage":
        return f"train {record['stage']}"
    return record.get("kind", "other")


def timeline(summary: Path, start: float) -> list[dict]:
    """(item, seconds) for every summary line: the seconds the line records (a stage's training, one
    evaluation), else the time since the previous line (1 s resolution). With `workers` > 1 steps
    overlap, so the items add up to more than the wall time."""
    items, previous = [], start
    for line in summary.read_text().splitlines():
        record = json.loads(line)
        stamp = time.mktime(time.strptime(record["time"], "%Y-%m-%d %H:%M:%S"))
        seconds = record.get("seconds", max(stamp - previous, 0.0))
        items.append({"item": item_name(record), "seconds": round(seconds, 1),
                      **({"peak_rss_mb": record["peak_rss_mb"]} if "peak_rss_mb" in record else {})})
        previous = stamp
    return items


def by_stage(items: list[dict]) -> dict:
    """Seconds per pipeline phase: base, sft, rlvr, and each OPSD arm, split into training and evaluation."""
    totals: dict[str, float] = {}
    for entry in items:
        kind, _, what = entry["item"].partition(" ")
        if kind not in ("train", "eval"):
            continue
        checkpoint = what.split("/")[0]
        key = f"{checkpoint} {'training' if kind == 'train' else 'evaluation'}"
        totals[key] = round(totals.get(key, 0.0) + entry["seconds"], 1)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--run-dir", default=None, help="where the demo runs (default: a fresh temporary folder)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from opsdlab.config import load_config
    from opsdlab.run.pipeline import run_pipeline
    from opsdlab.report import write_report
    from opsdlab.modeling.runtime import peak_memory_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="opsdlab-demo-time-"))
    if (run_dir / "summary.jsonl").exists():
        raise SystemExit(f"{run_dir} already holds a run; timing needs a fresh folder")
    config = load_config("tiny", [f"run_dir={run_dir}", *args.overrides])
    load_before = os.getloadavg()
    start = time.time()
    run_pipeline(config)
    pipeline_done = time.time()
    write_report(run_dir)
    end = time.time()
    items = timeline(run_dir / "summary.jsonl", start)
    items.append({"item": "report", "seconds": round(end - pipeline_done, 1)})
    result = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/demo_time.py " + " ".join(
            ([f"--threads {args.threads}"] if args.threads else []) + args.overrides),
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "workers": config.workers,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(end - start, 1),
        "per_stage_seconds": by_stage(items),
        # the most resident memory of any one process: this one, or a worker (its lines' peaks)
        "peak_rss_mb": max([peak_memory_mb().get("peak_rss_mb", 0.0),
                            *(item.get("peak_rss_mb", 0.0) for item in items)]),
        "items": items,
        "run_dir": run_dir.name,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total_seconds", "per_stage_seconds", "peak_rss_mb", "torch_threads",
                                              "load_average_before", "load_average_after")}, indent=2))


if __name__ == "__main__":
    main()
