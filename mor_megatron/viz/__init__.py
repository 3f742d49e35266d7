"""Views of what a trained MoR model does: :mod:`mor_megatron.viz.depth` (recursions per token)."""
