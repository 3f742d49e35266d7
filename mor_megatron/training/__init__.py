"""Training loop components: the trainer, step, evaluation, optimizer, checkpoints and the two engines."""
