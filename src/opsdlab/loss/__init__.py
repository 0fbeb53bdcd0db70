"""The loss layer: tensor math of the objectives, with no trainer and no I/O.

Divergences between student and teacher (`divergences`), the contrastive target (`contrastive`),
rollout gates (`gates`) and reward functions (`rewards`). Imports only `config` and `tasks`.
"""
