"""The run layer: a run directory's steps and their execution.

`pipeline` runs a config (its module docstring lays out the run directory), `plan` lists the steps
after the base model, `problems` the problems they read, `outputs` the record each output must carry
and `provenance` how records are written and compared; `rundir` holds the run directory's log and
marks and agrees it with the config before a run; `train_steps`, `eval_steps` and `budget_steps` are
the steps themselves, `steps` maps each kind to its function and `workers` runs steps side by side.
`preflight` checks inputs before any model loads, and `study` runs presets over seeds.
"""
