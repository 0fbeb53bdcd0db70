"""Peak host memory and wall time of the OPSD loss: chunked versus naive.

What is measured: forward + backward of the summed per-token divergence from
final hidden states, through a random ``lm_head`` of shape ``(vocab, hidden)``
with a small hidden size, so that the ``[tokens, vocab]`` logits and their
autograd intermediates dominate memory (as they do for real models with a
~152k vocabulary).

Method: each variant runs in a fresh subprocess
(``python benchmarks/opsd_loss_memory.py --variant naive`` / ``--variant
chunked``) so that allocator caches and peak counters are not shared. In the
child, the inputs (hidden states, head weight, ids) are allocated first and
the resident set size at that moment is recorded (``VmRSS`` from
``/proc/self/status``; where that file does not exist, ``ru_maxrss``). After
the loss forward + backward (repeated ``--repeats`` times; peak memory does
not grow with repeats because the shapes are identical), the peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The reported figure is
``peak - baseline``: the extra memory the loss computation needed. Large
tensors are mmap-backed by the allocator and returned to the OS on free, so
RSS tracks live tensor memory closely on Linux/CPU. Wall time is the fastest
of the repeats.

The parent (default invocation) runs both children, prints a Markdown table
and writes ``benchmarks/results/opsd_loss_memory.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TOKENS = 4096
DEFAULT_VOCAB = 151_936
DEFAULT_HIDDEN = 64
# Chosen so that chunked peak <= 1/8 of naive at the default sizes (see the JSON).
DEFAULT_CHUNK_SIZE = 256
TARGET_RATIO = 1 / 8

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "opsd_loss_memory.json"


def _maxrss_bytes() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss_bytes() -> int:
    """Current RSS in bytes from /proc; falls back to the peak where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: allocate inputs, run the loss, report memory and time."""
    import torch

    from opsdlab.config.divergence import DivergenceOptions
    from opsdlab.loss.chunked import chunked_divergence, naive_divergence

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
    student_hidden = torch.randn(args.tokens, args.hidden).requires_grad_()
    teacher_hidden = (student_hidden.detach() + 0.3 * torch.randn(args.tokens, args.hidden)).contiguous()
    sampled_ids = torch.randint(0, args.vocab, (args.tokens,))
    fn = {"naive": naive_divergence, "chunked": chunked_divergence}[args.variant]
    options = DivergenceOptions()

    baseline = _current_rss_bytes()
    times = []
    loss_value = float("nan")
    for _ in range(args.repeats):
        student_hidden.grad = None
        head.weight.grad = None
        start = time.perf_counter()
        total, _stats = fn(
            student_hidden, teacher_hidden, head, head, sampled_ids, args.divergence, options,
            chunk_size=args.chunk_size,
        )
        (total / args.tokens).backward()
        times.append(time.perf_counter() - start)
        loss_value = total.item() / args.tokens
        del total, _stats
    peak = _maxrss_bytes()
    return {
        "variant": args.variant,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "extra_peak_bytes": peak - baseline,
        "wall_s_min": min(times),
        "wall_s_all": times,
        "mean_loss": loss_value,
        "grad_norm_hidden": float(student_hidden.grad.norm()),
        "grad_norm_head": float(head.weight.grad.norm()),
    }


def _child_cmd(args: argparse.Namespace, variant: str) -> list[str]:
    return [
        sys.executable, os.path.abspath(__file__), "--variant", variant,
        "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
        "--chunk-size", str(args.chunk_size), "--divergence", args.divergence,
        "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]


def run_all(args: argparse.Namespace) -> dict:
    """Parent: one fresh subprocess per variant, then table + JSON."""
    import torch

    rows = {}
    for variant in ("chunked", "naive"):
        proc = subprocess.run(_child_cmd(args, variant), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    ratio = rows["chunked"]["extra_peak_bytes"] / max(rows["naive"]["extra_peak_bytes"], 1)
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "method": (
            "each variant in a fresh subprocess; extra_peak_bytes = ru_maxrss after forward+backward "
            "minus VmRSS right after allocating inputs; wall_s_min = fastest of the repeats"
        ),
        "config": {
            "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
            "chunk_size": args.chunk_size, "divergence": args.divergence,
            "repeats": args.repeats, "threads": args.threads or None,
            "logits_bytes_fp32": args.tokens * args.vocab * 4,
        },
        "results": rows,
        "chunked_over_naive_peak": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "loss_abs_diff": abs(rows["chunked"]["mean_loss"] - rows["naive"]["mean_loss"]),
    }

    gib = 1024**3
    print(f"OPSD loss ({args.divergence}), tokens={args.tokens}, vocab={args.vocab}, "
          f"hidden={args.hidden}, chunk_size={args.chunk_size}\n")
    print("| variant | extra peak RSS (GiB) | wall time (s) | mean loss |")
    print("|---|---:|---:|---:|")
    for variant in ("naive", "chunked"):
        r = rows[variant]
        print(
            f"| {variant} | {r['extra_peak_bytes'] / gib:.3f} | {r['wall_s_min']:.2f} "
            f"| {r['mean_loss']:.6f} |"
        )
    print(f"\nchunked / naive peak = {ratio:.4f} (target <= {TARGET_RATIO:.4f}: "
          f"{'met' if result['meets_target'] else 'NOT met'})")

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("naive", "chunked"), default=None,
                        help="run one variant in this process and print JSON (used by the parent)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--divergence", default="reverse_kl")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--output", default=str(RESULTS_PATH))
    args = parser.parse_args(argv)
    if args.variant is None:
        run_all(args)
    else:
        print(json.dumps(run_variant(args)))


if __name__ == "__main__":
    main()
