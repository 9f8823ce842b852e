"""Where and in which precision a process computes: one object that every stage asks.

``run.device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``auto`` = the first visible GPU,
else the CPU) and ``run.precision`` (``fp32`` | ``bf16`` | ``fp16``) are resolved into a
:class:`Runtime` where the process learns what it may use: inside each ClientApp handler (Ray
sets an actor's visible GPUs at run time; ``clients/client_app.py``), in the ServerApp
(``server/server_app.py``) and in scripts. It is made current with :func:`use`, and the shared
loop (``metamoe/training.py``) and the few other compute functions ask :func:`current` to
place a model (:meth:`Runtime.place`), move a batch (:meth:`Runtime.batch`: pinned and
non-blocking on CUDA) and open the autocast context (:meth:`Runtime.autocast`). Autocast is
for compute only: parameters, and so every weight that travels, stay float32; a gradient
scaler is used for fp16 only. Without a current runtime everything runs on the CPU in fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """``run.device`` / ``run.precision`` asks for something this process cannot use."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``meta`` (tests) as a torch device."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec in ("cpu", "meta"):
        return torch.device(spec)
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"run.device={spec!r} but this process sees no GPU (in a "
                              "simulation, give the ClientApps a GPU share: --gpus-per-client)")
        dev = torch.device("cuda:0" if spec == "cuda" else spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"run.device={spec!r} but this process sees "
                              f"{torch.cuda.device_count()} GPU(s)")
        return dev
    raise DeviceError(f"run.device={spec!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class Runtime:
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    workers: int = 0  # DataLoader worker processes per loop (0: fetch in this process)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DeviceError(f"run.precision={self.precision!r} is not one of "
                              f"{list(PRECISIONS)}")
        if self.precision == "fp16" and self.device.type == "cpu":
            raise DeviceError("run.precision='fp16' needs a GPU (CPU autocast is bf16 only)")

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "fp32", workers: int = 0) -> Runtime:
        return cls(resolve_device(device), str(precision), int(workers))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def place(self, module: nn.Module) -> nn.Module:
        """Move a module to the device (in place; its parameters keep their fp32 dtype)."""
        return module.to(self.device)

    def batch(self, t: torch.Tensor) -> torch.Tensor:
        """A batch on the device: pinned and non-blocking from the CPU to a GPU."""
        t = torch.as_tensor(t)  # lazily decoded inputs arrive as numpy arrays
        if t.device == self.device:
            return t
        if self.is_cuda and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision compute for the forward pass; a no-op in fp32 (and on meta)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def release(self) -> None:
        """Return the cached GPU memory a handler allocated (its models are gone by now)."""
        if self.is_cuda:
            gc.collect()  # modules with hooks can sit in reference cycles
            torch.cuda.empty_cache()


def host(t: torch.Tensor) -> torch.Tensor:
    """A result on the CPU, where numpy and the messages take it (meta tensors stay meta:
    they have no data to copy)."""
    return t if t.is_meta else t.cpu()


_CURRENT: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("metamoe_runtime",
                                                                          default=None)
_CPU = Runtime()


def current() -> Runtime:
    """The runtime this thread computes with (CPU fp32 unless :func:`use` set one)."""
    return _CURRENT.get() or _CPU


@contextlib.contextmanager
def use(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` current inside the block, then release what it cached on the GPU."""
    token = _CURRENT.set(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.reset(token)
        runtime.release()


def from_run_config(run) -> Runtime:
    """The runtime of a resolved config's ``run`` section."""
    return Runtime.resolve(str(run.device), str(run.precision), int(run.data_workers))
