"""The evaluation layer: sampling and grading responses (`evaluate`, with the transformers and vLLM
backends behind one interface, `vllm_backend`) and the metrics computed from graded samples
(`metrics`, one module per concept). Imports only lower layers.
"""
