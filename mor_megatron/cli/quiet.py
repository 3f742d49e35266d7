"""Known third-party noise, silenced in one place: each entry point calls :func:`silence_known_warnings` first.

Every process of a launch used to print ~16 lines that say nothing actionable: megatron-core's notes that
Apex / Transformer Engine / absl are absent (it then uses torch's kernels and the standard logging, which is
what a CPU run or an apex-less GPU container wants), a deprecation of a megatron default we never set, its
rank guess in a lone process, its rerun state machine announcing that it is disabled, and torch's note that a
CUDA build finds no CUDA runtime (CPU machines with the CUDA wheel). Only these exact messages are filtered;
every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, module regex) of UserWarnings that megatron-core emits at import or config time.
_KNOWN_WARNINGS = (
    (r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core"),
    (r"Transformer Engine and Apex are not installed", r"megatron\.core"),
    (r"full scope is deprecated\.", r"megatron\.core"),  # TransformerConfig's own default (0.16 and 0.19 wording)
    (r"absl\.logging is not installed", r"megatron\.core"),  # 0.19
    (r"Could not determine rank from torch\.distributed", r"megatron\.core"),  # 0.19, a lone process
    # Its datasets then pad with -1, which is right: a Hugging Face tokenizer padding with its EOS (ours, when
    # it has no pad token, see data/tokenizer.py) must not mask the EOD tokens' loss.
    (r"The pad token id in the tokenizer collides with another special token id", r"megatron\.core"),
)
# Log records (logger name: message prefixes) that only announce defaults or the machine.
_KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "megatron.core.rerun_state_machine": ("RerunStateMachine initialized in mode RerunMode.DISABLED",
                                          "Implicit initialization of Rerun State Machine!"),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _DropKnownRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence_known_warnings() -> None:
    """Filter the known messages in this process (idempotent; call before importing megatron-core)."""
    for message, module in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    for name, prefixes in _KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecords) for f in logger.filters):
            logger.addFilter(_DropKnownRecords(prefixes))
