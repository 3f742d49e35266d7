"""Checkpoints of both training backends and of ``mor-convert``: ``layout`` (step folders, ``latest``, atomic
publish, keep-last; the one implementation), ``megatron`` (``torch_dist``; also the one weights-only writer),
``deepspeed``, ``integrity``, ``loop_state``, ``rng_state``, ``resume_config``, ``save_dir_lock``, ``errors``."""
