"""The stages layer: one module per training stage (`sft`, `rlvr`, `opsd`), the teacher's weights
(`teacher`), how each compaction method trains an arm (`methods`), held-out checks during training
(`checks`), the rollout tokens a stage generates and the budget that may end it (`rollout_budget`) and
stage progress (`progress`). A stage never imports the run layer: the held-out checks
evaluate through the evaluation layer (`evaluate.evaluate_sharded`), and the run layer calls the
stages.
"""
