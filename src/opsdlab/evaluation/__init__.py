"""The evaluation layer: sampling and grading responses (`evaluate`, with its problems split over the
processes of a launch by `evaluate_sharded`), the transformers and vLLM backends behind one interface
(`backend`, `vllm_backend`), and the metrics computed from graded samples (`metrics`, one module per
concept). Imports only lower layers.
"""
