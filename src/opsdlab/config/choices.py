"""The named choices a config accepts whose implementations live in higher layers.

Validation needs the names, not the code behind them: keeping them here lets a config be checked
without importing torch, transformers or TRL. Where a registry is plain data (a teacher context's
field, a method's defaults), this layer holds the data itself and the higher layer reads it from
here; where a registry maps names to code (a gate, a divergence), this layer holds the names and a
test checks they are the registry's keys.
"""

from __future__ import annotations

STAGES = ("sft", "rlvr", "opsd")
