"""Megatron-path pretraining script, for launchers that take a file: ``torchrun ... pretrain/pretrain_mor.py``.

Same as ``-m mor_megatron.pretrain`` and ``mor-pretrain``.
"""

import sys

from mor_megatron.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
