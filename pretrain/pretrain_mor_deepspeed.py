"""DeepSpeed ZeRO pretraining of MoR models: ``deepspeed pretrain/pretrain_mor_deepspeed.py --config C.yaml ...``.

A thin wrapper around :mod:`mor_megatron.pretrain_deepspeed` for launchers that want a script path (the
deepspeed launcher without ``--module``); see that module and docs/deepspeed.md.
"""

import sys
from pathlib import Path

# Run from a checkout without installing the package: the repository root holds mor_megatron/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mor_megatron.pretrain_deepspeed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
