"""The stages layer: one module per training stage (`sft`, `rlvr`, `opsd`), the teacher's weights
(`teacher`), the compaction methods an arm can run (`methods`), held-out checks during training
(`checks`) and stage progress (`progress`). A stage never imports the run layer: what it needs from
above (an evaluation over several processes) is passed in as a function.
"""
