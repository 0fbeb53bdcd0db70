"""Evaluation metrics for opsdlab: accuracy, length, and their uncertainty.

The project's central claim is about a trade-off: after RLVR, on-policy
self-distillation (OPSD) should shorten responses without losing accuracy.
Supporting that claim needs more than a point estimate, so this package
provides, one concept per module:

* ``samples``: the graded-sample record (:class:`~.samples.Sample`) that every
  evaluation produces and every metric reads;
* ``summary``: per-run summaries (avg@k, unbiased pass@k, maj@k, length
  statistics);
* ``efficiency``: efficient-reasoning metrics (accuracy within token budgets
  and how many tokens a correct response spends after it first wrote the
  answer);
* ``bootstrap``: uncertainty estimates that respect the data's structure
  (samples of the same problem are correlated, so the bootstrap resamples
  *problems*);
* ``comparison``: paired comparisons between two evaluations of the same
  problems (accuracy flips, paired bootstrap of accuracy and length change,
  the accuracy-efficiency score);
* ``collapse``: signs of a collapse (a response caught in a loop, token
  entropy over responses);
* ``diagnostics``: diagnostics for *how* responses got shorter
  (hesitation-marker density, per-position KL, tokens whose probability the
  teacher moves most).

Everything here is a pure function on plain Python lists, dataclasses and
numbers: no model, tokenizer or file I/O, so it is cheap to test and safe to
call from any stage. Results are JSON-able (plain ``int``/``float``/``str``/
``list``/``dict``/``None``), so they can be written straight into reports.
Import each name from its module.
"""
