"""Console entry points of mor_megatron (``[project.scripts]`` in pyproject.toml); each imports lazily."""
