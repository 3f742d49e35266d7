"""Inference: sampling from checkpoints (and, later, the exported HF model and the depth-wise batching engine)."""
