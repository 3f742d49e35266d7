"""Inference: Hugging Face modeling code for exported MoR models (``hf/``), the continuous depth-wise batching engine (``engine``), and sampling from training checkpoints (``sample``)."""
