"""What the teacher changes: from the OPSD training rollouts `token_stats.jsonl` keeps, the tokens
whose log-probability the teacher lowers or raises most per arm, and the per-token divergence by
response position.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opsdlab.evaluation.metrics.diagnostics import per_position_mean, top_tokens_by_shift  # noqa: E402
from opsdlab.modeling.models import load_tokenizer  # noqa: E402
from opsdlab.modeling.runtime import read_jsonl  # noqa: E402
from opsdlab.report.figures import _save  # noqa: E402


def readable_token(text: str) -> str:
    """A token as a Markdown code span with its whitespace shown: ⏎ newline, ␣ space, ⇥ tab."""
    shown = text.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥").replace("|", "\\|") or "∅"
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def token_shifts(run_dir: Path, config: dict, colors: dict, out: Path) -> list[str]:
    """Tokens whose log-probability the teacher lowers/raises most, per OPSD arm, and the per-token
    divergence by response position, both from the training rollouts `token_stats.jsonl` keeps."""
    stats = {f"opsd-{path.parent.name}": rows for path in sorted((run_dir / "opsd").glob("*/token_stats.jsonl"))
             if (rows := read_jsonl(path))}
    if not stats:
        return []
    tokenizer = _tokenizer(run_dir)
    lines = ["Per OPSD arm, over the training rollouts whose per-token numbers were kept: the tokens whose "
             "**shift** = log p_T − log p_S is most negative and most positive on average (teacher log-prob minus "
             "student log-prob of the sampled token; negative: the teacher wants the token less than the student "
             "does, so training lowers it; positive: the teacher prefers it more). ⏎ is a newline, ␣ a space; "
             "(×n) counts the token's occurrences (5 at least).", "",
             "| arm | teacher lowers most: token shift (×n) | teacher raises most: token shift (×n) |",
             "|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    divergences = set()
    for arm, rows in stats.items():
        records = [(tokenizer.decode([t]) if tokenizer else str(t), shift)
                   for row in rows for t, shift in zip(row["token_ids"], row["logp_shift"])]
        top = top_tokens_by_shift(records, n=8)
        cells = [", ".join(f"{readable_token(x['token'])} {x['mean_shift']:+.2f} (×{x['count']})" for x in top[side])
                 or "–" for side in ("lowered", "raised")]
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} |")
        names = sorted({row.get("divergence", "?") for row in rows})
        divergences.update(names)
        steps = sorted({row["step"] for row in rows})
        curve = per_position_mean([row["loss"] for row in rows], bucket=4)
        ax.plot([4 * i for i in range(len(curve))], curve, lw=1.2, color=colors.get(arm, "tab:gray"),
                label=f"{arm}: {'/'.join(names)}, {len(steps)} steps, {len(rows)} rollouts, {len(records)} tokens")
    which = "/".join(sorted(divergences))
    ax.set_xlabel("response position (tokens, buckets of 4)")
    ax.set_ylabel(f"per-token {which} (teacher vs student)")
    ax.set_title(f"OPSD per-token {which} by response position (training rollouts)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out)
    return lines


def _tokenizer(run_dir: Path):
    for folder in (run_dir / "rlvr" / "model", run_dir / "sft" / "model", run_dir / "base" / "model"):
        if (folder / "tokenizer_config.json").exists():
            return load_tokenizer(folder)
    return None
