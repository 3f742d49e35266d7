"""CPU runtime for megatron-core: TP, PP, DP, the distributed optimizer and dist-checkpointing on gloo.

Why it exists. megatron-core has no CPU path: it allocates with ``device="cuda"`` or
``torch.cuda.current_device()`` (schedules, DDP buffers, optimizer, clip-grad, p2p, attention buffers), calls
``.cuda()``/``.to(cuda)``, orders work on CUDA streams and events (0.19's grad buffers), asserts
``param.type() == "torch.cuda.FloatTensor"`` and keeps its dropout/TP RNG in the CUDA generator. Tests and the
embedded demo run megatron-core on CPU processes joined by gloo, so :func:`enable_cpu_runtime` lets megatron's
own code see a host stand-in for CUDA (``docs/megatron-core-notes.md`` section 5).

Scope: megatron's code only. Nothing else in the process (torch, transformers, DeepSpeed, this project, the
user's script) sees a change, and device contexts such as ``with torch.device("meta")`` keep working everywhere.

(a) ``torch`` as megatron sees it. The global name ``torch`` of every ``megatron.*`` module (those imported
    already and, through an import hook, those imported later) is rebound to :class:`_TorchForMegatron`: the
    real torch, except that the tensor factories map a CUDA ``device`` to the CPU and ``torch.cuda`` is
    :class:`_CudaOnHost` (device 0, streams and events that order nothing because host work is already
    ordered, ``synchronize``/``empty_cache`` no-ops, the RNG calls on the CPU generator). The real ``torch``
    module is never modified. Memory queries (``max_memory_allocated`` ...) are left to raise: a fake 0 would
    be a wrong measurement.
(b) Tensor methods cannot be rebound per module, so ``Tensor.to(cuda)``, ``Tensor.cuda()`` and ``Tensor.type()``
    are wrapped process-wide, but act only when the call comes from megatron (the first frame outside torch
    belongs to a ``megatron.*`` module; ``type()`` only for direct calls): they keep the tensor on the CPU and
    report the CUDA type name megatron's optimizer and clip-grad checks expect. Any other caller gets torch's
    own behaviour, so a stray ``.cuda()`` in ``mor_megatron`` still fails on CPU, as it would without CUDA.
(c) RNG. megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state`` read and write the CPU generator. On CPU
    the default generator is the one dropout and CPU initialisation draw from, so the TP tracker's
    fork/restore keeps its meaning (activation recompute with dropout reproduces the same masks). Its warning
    "CPU RNG state changed within GPU RNG context" (always true here, as both are one generator) is filtered.
(d) ``megatron.core.jit.disable_jit_fuser()``: no ``torch.compile`` for megatron modules imported afterwards.

A ``TorchFunctionMode`` is deliberately not used: the mode is off inside ``Tensor.backward``, so megatron's
activation recompute (``CheckpointFunction``) escapes it. ``torch.cuda.is_available()`` stays False, because
megatron branches on it.

The GPU path never goes through this module: :func:`enable_cpu_runtime` returns without touching anything when
``torch.cuda.is_available()``. The runtime is permanent for the process; installing twice is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import logging
import sys
import time
from types import FrameType, ModuleType
from typing import Any, Callable

import torch

_FACTORY_NAMES = (
    "empty", "empty_strided", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "eye", "linspace",
    "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
)
_MEGATRON_PREFIX = "megatron."
_RNG_MODULE = "megatron.core.tensor_parallel.random"
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_enabled = False


def cpu_runtime_enabled() -> bool:
    """Whether :func:`enable_cpu_runtime` has installed the runtime in this process."""
    return _enabled


def enable_cpu_runtime() -> bool:
    """Install the CPU runtime for megatron-core (see the module docstring); idempotent.

    Call it before building megatron models, ideally before importing megatron model modules (so that
    ``disable_jit_fuser`` reaches them). :func:`mor_megatron.runtime.init_distributed` calls it on CPU.

    Returns:
        True when the runtime is installed (now or by an earlier call), False when CUDA is available and
        nothing was done.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    _patch_tensor_methods()
    sys.meta_path.insert(0, _MegatronImportHook())
    for name, module in list(sys.modules.items()):
        if name.startswith(_MEGATRON_PREFIX):
            _retarget(module)
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


# ------------------------------------------------------------------------------------------------------------
# (a) torch and torch.cuda as megatron's modules see them
# ------------------------------------------------------------------------------------------------------------

class _HostEvent:
    """A ``torch.cuda.Event`` stand-in: host work is complete when it returns, so an event only keeps time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._recorded_at = time.perf_counter()

    def record(self, stream: Any = None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: _HostEvent) -> float:
        """Milliseconds between this event's and ``end_event``'s records, as CUDA events report."""
        return (end_event._recorded_at - self._recorded_at) * 1e3


class _HostStream:
    """A ``torch.cuda.Stream`` stand-in: there is one host stream and its work is already ordered."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: _HostEvent | None = None) -> _HostEvent:
        event = event if event is not None else _HostEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_HOST_STREAM = _HostStream()


class _CudaOnHost:
    """``torch.cuda`` inside megatron's modules: device 0 on the host; everything not defined here is real."""

    Event = _HostEvent
    Stream = _HostStream

    def __init__(self) -> None:
        # torch.cuda.random.get_rng_state(...) is spelled through the submodule in megatron's RNG code.
        self.random = self

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _HostStream:
        return _HOST_STREAM

    @staticmethod
    def default_stream(device: Any = None) -> _HostStream:
        return _HOST_STREAM

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(stream)

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _on_host(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # The factories take `device` as a keyword only, so looking at kwargs is enough.
    @functools.wraps(factory)
    def host_factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return host_factory


class _TorchForMegatron(ModuleType):
    """``torch`` inside megatron's modules: the real module but for host factories and :class:`_CudaOnHost`."""

    def __init__(self) -> None:
        super().__init__("torch", torch.__doc__)
        for name in _FACTORY_NAMES:
            setattr(self, name, _on_host(getattr(torch, name)))
        self.cuda = _CudaOnHost()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH_FOR_MEGATRON = _TorchForMegatron()


def _retarget(module: ModuleType) -> None:
    """Rebind a megatron module's global ``torch`` to :data:`_TORCH_FOR_MEGATRON`."""
    if getattr(module, "torch", None) is torch:
        module.torch = _TORCH_FOR_MEGATRON


class _RetargetingLoader(importlib.abc.Loader):
    """Runs a megatron module with its own loader, then retargets it; other loader methods pass through."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _retarget(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Finds megatron modules with the finders after it and retargets them once they have run."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if not fullname.startswith(_MEGATRON_PREFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RetargetingLoader(spec.loader)
                return spec
        return None


# ------------------------------------------------------------------------------------------------------------
# (b) Tensor methods, for megatron's calls only
# ------------------------------------------------------------------------------------------------------------

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
            return name.startswith(_MEGATRON_PREFIX)
        frame = frame.f_back
    return False


def _patch_tensor_methods() -> None:
    original_to = torch.Tensor.to
    original_cuda = torch.Tensor.cuda
    original_type = torch.Tensor.type

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

    @functools.wraps(original_type)
    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # Only direct calls from megatron: torch internals and other libraries (DeepSpeed) see the true type.
        direct_caller = _module_name(sys._getframe(1))
        if not args and not kwargs and self.device.type == "cpu" and direct_caller.startswith(_MEGATRON_PREFIX):
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    torch.Tensor.type = tensor_type


# ------------------------------------------------------------------------------------------------------------
# (c) megatron's CUDA RNG state on the CPU generator
# ------------------------------------------------------------------------------------------------------------

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
    rng._get_cuda_rng_state = _get_rng_state_cpu
    rng._set_cuda_rng_state = _set_rng_state_cpu
    logging.getLogger(_RNG_MODULE).addFilter(_DropRngWarning())
