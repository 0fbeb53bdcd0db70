"""The modeling layer: building, loading and saving models and tokenizers (`models`), the decoder stack
and LM head under any wrapper (`parts`), padded batches scored without a tokens x tokens attention mask
(`padding`), the process, device and checkpoint helpers every stage shares (`runtime`), and what every
command prints: the words a stage says and how progress is drawn (`console`). Imports only lower layers.
"""
