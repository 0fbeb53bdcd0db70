"""The run layer: planning a run folder's steps and executing them (`pipeline`), the records that say
what made each output (`provenance`), checks before any model loads (`preflight`) and studies over
presets and seeds (`study`).
"""
