"""The compaction report: a pure function of a run directory (see `run.pipeline` for its layout).

`write_report(run_dir)` reads the resolved config, evaluation summaries and samples, training
metrics and OPSD token statistics, and writes `report/report.md` with PNG figures. It can be rerun
at any time, on a finished or a partial run. It opens with its findings (each change with its paired
95% CI, stated only when the CI excludes 0) and a short guide to its metrics. A run over pipeline
seeds (`seed-<n>/` directories, `pipeline.run_seeds`) gets each seed's own report plus one over
seeds: spread per checkpoint, the teacher advantage and every arm's paired change per seed, and as
findings only what holds in every seed.

The modules, each one concept, lowest first:

- `rundir`: reading a run directory: checkpoints in pipeline order, evaluation summaries and
  samples, the config, the `seed-<n>/` folders.
- `changes`: paired changes between checkpoints (bootstrap CIs over problems), per run and per
  seed, and whether a change keeps its sign in every seed.
- `tables`: the Markdown tables and their cells.
- `findings`: the findings lines and the guide to the metrics.
- `figures`: the colour of each checkpoint and the figures of accuracy, length and changes.
- `samples`: sample responses with their problem's text and gold answer.
- `probe`: the SFT teacher probe as tables.
- `token_shifts`: what the teacher changes, per token and by response position.
- `checks`: held-out checks during training: their table and figure.
- `compare`: compaction methods side by side (the methods sections).
- `run`: one run's report (`write_run_report`) and the summary lines the commands print.
- `seeds`: the report over pipeline seeds and `write_report`, which picks it or the one-run report.
- `ladder`: the report over the trace-length ladder of a study.
"""

from opsdlab.report.run import stage_summary, write_run_report
from opsdlab.report.rundir import seed_dirs
from opsdlab.report.seeds import write_report, write_seeds_report

__all__ = ["seed_dirs", "stage_summary", "write_report", "write_run_report", "write_seeds_report"]
