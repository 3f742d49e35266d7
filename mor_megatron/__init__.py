"""mor_megatron: Mixture-of-Recursions language models on megatron-core."""
