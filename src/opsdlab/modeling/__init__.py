"""The modeling layer: building, loading and saving models and tokenizers (`models`), and the
process, device and checkpoint helpers every stage shares (`runtime`). Imports only lower layers.
"""
