"""Model code of mor_megatron: sharing layout, routers, the recursion block, specs, FLOPs/parameter accounting.

Kept import-light on purpose: submodules import torch and megatron-core themselves, so pure-python parts
(``flops``) can be imported without them.
"""
