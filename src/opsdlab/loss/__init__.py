"""The loss layer: tensor math of the objectives, with no trainer and no I/O.

Per-token divergences between student and teacher (`divergences`), taken from hidden states one row
chunk at a time (`chunked`) against the teacher's log-probabilities or a target on a per-token support
(`targets`); the contrastive target (`contrastive`), rollout gates (`gates`) and reward functions
(`rewards`). Imports only `config` and `tasks`.
"""
