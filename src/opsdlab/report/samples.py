"""The report's sample responses: a few held-out problems with their text and gold answer, rebuilt
from the run's config (evaluations keep only problem ids), and the first response of the starting
checkpoint and of every OPSD arm, problems where those disagree on correctness first.
"""

from __future__ import annotations

from pathlib import Path

from opsdlab.report.rundir import _samples


SAMPLE_PROBLEMS = 4


def held_out_problems(run_dir: Path, set_name: str) -> dict:
    """The evaluation set's problems by id (`data.Example`), rebuilt from the run's config the way the
    pipeline built them: evaluations keep only problem ids."""
    # imported here: the pipeline loads the training stages (TRL), which only this part of a report needs
    from opsdlab.config import load_config
    from opsdlab.run.problems import eval_sets
    from opsdlab.tasks import build_task

    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: no such file")
    config = load_config(run_dir / "config.yaml")
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    return {example.id: example for example in eval_sets(config, task).get(set_name, [])}


def sample_section(run_dir: Path, names: list[str], set_name: str, reference: str | None,
                   count: int = SAMPLE_PROBLEMS) -> list[str]:
    """`count` problems with their text and gold answer, and the first response of the starting
    checkpoint and of every OPSD arm: problems where those responses disagree on correctness first."""
    shown = [n for n in names if n == reference or n.startswith("opsd-")]
    firsts = {n: {s.problem_id: s for s in samples if s.sample_index == 0}
              for n in shown if (samples := _samples(run_dir, n, set_name))}
    if not firsts:
        return []
    ids = list(next(iter(firsts.values())))
    disagree = [p for p in ids if len({by_id[p].correct for by_id in firsts.values() if p in by_id}) > 1]
    chosen = (disagree + [p for p in ids if p not in disagree])[:count]
    try:
        problems, missing = held_out_problems(run_dir, set_name), "not in the evaluation set rebuilt from config.yaml"
    except Exception as error:  # an old or moved run still gets its report, saying why the text is missing
        problems, missing = {}, f"could not rebuild the evaluation set: {type(error).__name__}: {error}"
    lines = [f"The first response of `{reference}` and of each OPSD arm to {len(chosen)} of the {len(ids)} problems; "
             f"problems where these responses disagree on correctness come first ({len(disagree)} here).", ""]
    for pid in chosen:
        lines += [f"#### Problem `{pid}`", ""]
        if example := problems.get(pid):
            lines += [*(f"> {line}" for line in example.problem.strip().splitlines()), "",
                      f"Gold answer: `{example.answer}`", ""]
        else:
            lines += [f"(problem text and gold answer unavailable: {missing})", ""]
        for name, by_id in firsts.items():
            if s := by_id.get(pid):
                verdict = "correct" if s.correct else ("wrong, no answer found" if s.answer is None
                                                       else f"wrong (answer: `{s.answer}`)")
                lines += [f"**{name}**: {verdict}, {s.response_tokens} tokens{', truncated' if s.truncated else ''}",
                          "", "```text", s.text.strip(), "```", ""]
    return lines
