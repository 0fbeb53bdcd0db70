"""opsdlab: SFT -> RLVR -> OPSD, with on-policy self-distillation as a post-RL compaction stage."""

__version__ = "0.1.0"
