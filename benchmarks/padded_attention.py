"""What scoring a padded batch without a tokens x tokens attention mask costs and saves: one training
forward and backward through the decoder (`models.final_hidden`, as the OPSD loss and the checks run
it) of a left- and right-padded batch, masked (transformers' own path) against left-aligned
(`modeling.padding.left_aligned`), on the same model and batch, in alternating order.

    python benchmarks/padded_attention.py --json benchmarks/results/padded_attention_cpu.json
    python benchmarks/padded_attention.py --json out.json --device cuda --layers 4 --completions 4096 16384

Per completion length: median wall seconds of each path over `--steps` measured steps (after one
warm-up each), their ratio, the peak of live tensor bytes of one step of each (`real_shapes.LiveBytes`),
and the largest difference of the final hidden states at the real tokens. The model has Qwen3-1.7B's
shape with `--layers` decoder layers (bf16 weights, gradient checkpointing off); the batch is `--rows`
sequences of a 256-token prompt (the first row 16 tokens shorter, left-padded) and the completion (the
last row 10% shorter, right-padded). On a GPU (`--device cuda`) each path's step also records torch's
`max_memory_allocated` (workspaces included), and sdpa may take its flash kernel for the causal call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from opsdlab.config.memory import MODEL_SHAPES  # noqa: E402
import opsdlab.modeling.models as models  # noqa: E402
from opsdlab.modeling.models import final_hidden  # noqa: E402
from real_shapes import LiveBytes, build_model  # noqa: E402

PROMPT = 256
PATHS = ("masked", "left_aligned")


def padded_batch(rows: int, completion: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = PROMPT + completion
    ids = torch.randint(2, vocab, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, :16] = 0
    mask[-1, width - completion // 10:] = 0
    return ids.to(device), mask.to(device)


def step(model, ids, mask, path: str) -> torch.Tensor:
    """One forward and backward; returns the final hidden states (detached). `final_hidden` runs left-aligned;
    the masked path takes that away for the one call."""
    original = models.left_aligned
    if path == "masked":
        models.left_aligned = lambda model: contextlib.nullcontext()
    try:
        hidden = final_hidden(model, ids, mask)
    finally:
        models.left_aligned = original
    (hidden.float().square() * mask.unsqueeze(-1)).mean().backward()
    model.zero_grad(set_to_none=True)
    if hidden.is_cuda:
        torch.cuda.synchronize()
    return hidden.detach()


def measure(model, completion: int, rows: int, steps: int) -> dict:
    device = next(model.parameters()).device
    ids, mask = padded_batch(rows, completion, model.config.vocab_size, device.type)
    hidden = {path: step(model, ids, mask, path) for path in PATHS}  # warm-up
    real = mask.bool()
    gap = (hidden["masked"].float() - hidden["left_aligned"].float())[real].abs().max().item()
    seconds = {path: [] for path in PATHS}
    for index in range(steps):
        for path in (PATHS if index % 2 == 0 else PATHS[::-1]):
            start = time.perf_counter()
            step(model, ids, mask, path)
            seconds[path].append(time.perf_counter() - start)
    peaks = {}
    for path in PATHS:
        live = LiveBytes()
        live.track(*model.parameters())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with live:
            step(model, ids, mask, path)
        peaks[path] = {"peak_bytes": live.peak, "largest": live.largest}
        if device.type == "cuda":
            peaks[path]["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    medians = {path: statistics.median(values) for path, values in seconds.items()}
    return {"completion": completion, "rows": rows, "tokens": rows * (PROMPT + completion),
            "seconds": {path: [round(v, 3) for v in values] for path, values in seconds.items()},
            "median_seconds": {path: round(v, 3) for path, v in medians.items()},
            "wall_ratio_aligned_over_masked": round(medians["left_aligned"] / medians["masked"], 3),
            "peak": peaks, "peak_saved_bytes": peaks["masked"]["peak_bytes"] - peaks["left_aligned"]["peak_bytes"],
            "max_hidden_gap_at_real_tokens": gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--completions", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=4, help="measured steps per path and length")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(MODEL_SHAPES["Qwen3-1.7B"], args.layers, torch.bfloat16).to(args.device)
    model.train()
    results = []
    for completion in args.completions:
        results.append(measure(model, completion, args.rows, args.steps))
        r = results[-1]
        print(f"completion {completion}: masked {r['median_seconds']['masked']} s, left-aligned "
              f"{r['median_seconds']['left_aligned']} s (x{r['wall_ratio_aligned_over_masked']}); peak saved "
              f"{r['peak_saved_bytes'] / 2**20:.0f} MiB; hidden gap {r['max_hidden_gap_at_real_tokens']:.3g}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": commit, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                                            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                                            "load_average_at_end": os.getloadavg()},
              "model": f"Qwen3-1.7B shape, {args.layers} layer(s), bf16", "prompt_tokens": PROMPT,
              "seconds": round(time.perf_counter() - start, 1), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
