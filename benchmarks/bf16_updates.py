"""How much of one AdamW step survives in bfloat16 weights, by learning rate.

    python benchmarks/bf16_updates.py [--lrs 1e-6,1e-5,2e-5,1e-4] [--out FILE]

On the tiny default model (random init: linear weights of std 0.02, norms at 1.0; a real checkpoint
has its own weight distribution), one AdamW step on a language-modelling loss of random tokens, from
the same weights held in float32 and in bfloat16: the fraction of weights the step leaves exactly
unchanged, next to `runtime.vanishing_update_fraction` (what the stages warn with, for a step of the
learning rate's size). Results go to benchmarks/results/bf16_updates.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-6,1e-5,2e-5,1e-4")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_updates.json"))
    args = parser.parse_args()

    import torch

    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer
    from opsdlab.modeling.runtime import vanishing_update_fraction
    from opsdlab.tasks import build_task

    tokenizer = build_tiny_tokenizer(build_task("synthetic").tokenizer_corpus())
    ids = torch.randint(5, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        row = {"learning_rate": lr}
        for dtype in (torch.float32, torch.bfloat16):
            model = build_tiny_model(tokenizer, seed=0).to(dtype)
            before = [p.detach().clone() for p in model.parameters()]
            predicted = vanishing_update_fraction(model.parameters(), lr)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()
            unchanged = sum(int((p.detach() == b).sum()) for p, b in zip(model.parameters(), before))
            total = sum(b.numel() for b in before)
            name = str(dtype).removeprefix("torch.")
            row[name] = {"unchanged_after_one_step": round(unchanged / total, 4), "predicted": round(predicted, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {"command": "python benchmarks/bf16_updates.py --lrs " + args.lrs,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
              "model": "tiny default (random init), all parameters trainable", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
