"""CPU runtime for megatron-core: TP, PP, DP, the distributed optimizer and dist-checkpointing on gloo.

Why it exists. megatron-core 0.16.1 has no CPU path: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()`` (schedules, DDP buffers, optimizer, clip-grad, p2p, attention buffers), calls
``.cuda()``/``.to(cuda)``, asserts ``param.type() == "torch.cuda.FloatTensor"`` and keeps its dropout/TP RNG
in the CUDA generator. Tests and the embedded demo run megatron-core on CPU processes joined by gloo, so
:func:`enable_cpu_runtime` installs a few shims (``docs/megatron-core-notes.md`` section 5).

What it patches, and how far each patch reaches:

(a) Device remap. ``torch.empty/zeros/ones/full/tensor/arange/rand*/randint/randperm/as_tensor/eye/linspace``,
    the ``*_like`` factories, ``Tensor.to(cuda)`` and ``Tensor.cuda()`` give CPU tensors, but only when the
    call comes from megatron code (the first frame outside ``torch`` belongs to a ``megatron.*`` module).
    A per-module ``torch`` proxy cannot do this: the allocations are spread over ~60 megatron modules, many
    imported lazily after the runtime is switched on. Scoping by caller keeps our own code honest: a stray
    ``.cuda()`` in ``mor_megatron`` still fails on CPU, as it must, because on GPU this runtime is absent.
    ``torch.cuda.current_device`` returns 0 and ``torch.cuda.synchronize``/``empty_cache`` do nothing,
    process-wide; on a CUDA-less process these calls could only raise. Memory queries
    (``max_memory_allocated`` ...) are left alone: memory is measured elsewhere and a fake 0 would be wrong.
(b) ``Tensor.type()`` without arguments, called directly from megatron code on a CPU tensor, returns the CUDA
    name (``"torch.cuda.FloatTensor"``) that megatron's optimizer and clip-grad checks expect.
(c) RNG. Inside ``megatron.core.tensor_parallel.random`` only, ``torch`` is a proxy whose
    ``cuda.get_rng_state/set_rng_state/manual_seed`` use the CPU generator, and ``_get_cuda_rng_state``/
    ``_set_cuda_rng_state`` read/write the CPU generator. On CPU the default generator is the one dropout and
    CPU initialisation draw from, so the tracker's fork/restore keeps its meaning (activation recompute with
    dropout reproduces the same masks). Its warning "CPU RNG state changed within GPU RNG context" (always
    true here, as both are one generator) is filtered.
(d) ``megatron.core.jit.disable_jit_fuser()``: no ``torch.compile`` for megatron modules imported afterwards.

A ``TorchFunctionMode`` is deliberately not used: the mode is off inside ``Tensor.backward``, so megatron's
activation recompute (``CheckpointFunction``) escapes it. ``torch.cuda.is_available()`` stays False, because
megatron branches on it.

The GPU path never goes through this module: :func:`enable_cpu_runtime` returns without touching anything
when ``torch.cuda.is_available()``. Patches are process-wide and permanent; installing twice is a no-op.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from types import FrameType
from typing import Any, Callable

import torch

_FACTORY_NAMES = (
    "empty", "empty_strided", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "eye", "linspace",
    "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)
_RNG_MODULE = "megatron.core.tensor_parallel.random"
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_enabled = False


def cpu_runtime_enabled() -> bool:
    """Whether :func:`enable_cpu_runtime` has installed its patches in this process."""
    return _enabled


def enable_cpu_runtime() -> bool:
    """Install the CPU shims for megatron-core (see the module docstring); idempotent.

    Call it before building megatron models, ideally before importing megatron model modules (so that
    ``disable_jit_fuser`` reaches them). :func:`mor_megatron.runtime.init_distributed` calls it on CPU.

    Returns:
        True when the shims are installed (now or by an earlier call), False when CUDA is available and
        nothing was done.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    _patch_devices()
    _patch_tensor_type()
    _patch_rng()
    from megatron.core import jit

    if hasattr(jit, "disable_jit_fuser"):
        jit.disable_jit_fuser()
    _enabled = True
    return True


def _is_cuda_device(device: Any) -> bool:
    """True for the GPU device spellings megatron uses: "cuda[:i]", torch.device("cuda"), an int index."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _module_name(frame: FrameType) -> str:
    return frame.f_globals.get("__name__", "")


def _from_megatron(frame: FrameType | None) -> bool:
    """Whether the first frame at or above ``frame`` that is not torch's own code belongs to megatron.

    torch frames are skipped so that ``module.cuda()`` -> ``nn.Module._apply`` -> ``Tensor.cuda`` called from
    megatron counts as megatron's call.
    """
    while frame is not None:
        name = _module_name(frame)
        if name != "torch" and not name.startswith("torch."):
            return name.startswith("megatron.")
        frame = frame.f_back
    return False


def _remap_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # The factories take `device` as a keyword only, so looking at kwargs is enough.
    @functools.wraps(factory)
    def on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")) and _from_megatron(sys._getframe(1)):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return on_cpu


def _patch_devices() -> None:
    for name in _FACTORY_NAMES:
        setattr(torch, name, _remap_factory(getattr(torch, name)))

    original_to = torch.Tensor.to
    original_cuda = torch.Tensor.cuda

    @functools.wraps(original_to)
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Tensor.to(device, ...), Tensor.to(device=...); a dtype or tensor first argument is not a device.
        if args and _is_cuda_device(args[0]) and _from_megatron(sys._getframe(1)):
            args = ("cpu", *args[1:])
        elif _is_cuda_device(kwargs.get("device")) and _from_megatron(sys._getframe(1)):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    @functools.wraps(original_cuda)
    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Like CUDA's .cuda() on a tensor already on the target device: the tensor itself.
        if _from_megatron(sys._getframe(1)):
            return self
        return original_cuda(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None


def _patch_tensor_type() -> None:
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Only direct calls from megatron: torch internals and other libraries (DeepSpeed) see the true type.
        direct_caller = _module_name(sys._getframe(1))
        if not args and not kwargs and self.device.type == "cpu" and direct_caller.startswith("megatron."):
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, *args, **kwargs)

    torch.Tensor.type = tensor_type


class _CudaRngOnCpu:
    """Stands in for ``torch.cuda`` inside megatron's RNG module: the RNG calls use the CPU generator."""

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchWithCpuRng:
    """Stands in for ``torch`` inside megatron's RNG module; all but ``torch.cuda`` is the real torch."""

    cuda = _CudaRngOnCpu()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_WARNING


def _get_rng_state_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # torch.get_rng_state() already returns a copy, so `clone` needs no extra work.
    return torch.get_rng_state()


def _set_rng_state_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch_rng() -> None:
    rng = importlib.import_module(_RNG_MODULE)
    rng.torch = _TorchWithCpuRng()
    rng._get_cuda_rng_state = _get_rng_state_cpu
    rng._set_cuda_rng_state = _set_rng_state_cpu
    logging.getLogger(_RNG_MODULE).addFilter(_DropRngWarning())
