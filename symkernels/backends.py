"""Which implementation computes an op: the one place that chooses.

PyTorch's dispatcher picks the device (the ops in :mod:`symkernels.ops` have a CPU and a CUDA
implementation); :func:`resolve` picks among what serves that device:

* ``cuda``: the native CUDA C++ kernels (CUDA tensors; float16, bfloat16, float32), for the ops in
  :data:`CUDA_OPS` with matrices of size up to :data:`CUDA_MAX_SIZE`;
* ``triton``: the Triton kernels (CUDA tensors; float16, bfloat16, float32; on CPU tensors in Triton's
  interpreter, ``TRITON_INTERPRET=1``, only when chosen by name: it is slow);
* ``cpu``: the native C++ kernels (CPU tensors; float16 and bfloat16 computed in float32, float32, float64);
* ``reference``: pure PyTorch (any device and floating dtype), the oracle; it is not an op implementation,
  so the functional API calls it directly.

A choice comes, in this order of precedence, from the ``backend=`` argument of a functional op, the innermost
:func:`use_backend` context, or the ``SYMKERNELS_BACKEND`` environment variable (read once, at import);
without one, the first of the list above that can serve the tensors is used. An explicit choice that cannot
serve raises with the reason; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from symkernels import _native

BACKEND_ENV_VAR = "SYMKERNELS_BACKEND"
BACKENDS = ("cuda", "triton", "cpu", "reference")  # the automatic choice's order
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The ops the native library has CUDA kernels for, and the largest Sinkhorn matrix they take (kMaxBlockN in
# csrc/sinkhorn/sinkhorn_cuda.h); the automatic choice passes over the cuda backend for the others.
CUDA_OPS = ("sinkhorn", "sinkhorn_backward", "expand_kernel", "expand_kernel_backward")
CUDA_MAX_SIZE = 1024


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    detail: str  # what it serves when usable, else why it cannot be used


_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "symkernels_backend", default=None
)
_ENV_CHOICE = os.environ.get(BACKEND_ENV_VAR, "").strip() or None


def _triton_state() -> tuple[str | None, bool]:
    """(why the Triton kernels cannot run, or None; whether they run in Triton's CPU interpreter)."""
    try:
        from symkernels.ops import triton_support
    except Exception as error:  # ImportError, or a broken triton install
        return f"triton is not usable: {type(error).__name__}: {error}", False
    problem = triton_support.problem()
    if problem is None and not triton_support.INTERPRETED and not torch.cuda.is_available():
        problem = (
            "no CUDA device is visible, and the Triton kernels run on CUDA tensors (set TRITON_INTERPRET=1 "
            "before importing symkernels to run them in Triton's CPU interpreter)"
        )
    return problem, triton_support.INTERPRETED


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process at all, or None."""
    if name == "reference":
        return None
    if name == "triton":
        return _TRITON_PROBLEM
    status = _native.native_status()
    if not status.loaded:
        return f"native library not loaded: {status.reason}"
    if name == "cuda" and not status.has_cuda_kernels:
        return "this build of the native library has no CUDA kernels"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _cannot_serve(
    name: str, device: torch.device, dtype: torch.dtype, op: str, max_size: int | None, *, explicit: bool
) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``device``/``dtype`` tensors (n up to ``max_size``)."""
    reason = _UNAVAILABLE[name]
    if reason is not None:
        return reason
    if name == "reference":
        return None
    if name == "cuda" and op not in CUDA_OPS:
        return f"the native library has no CUDA kernel for {op} (the triton backend serves it)"
    if name == "cuda" and max_size is not None and max_size > CUDA_MAX_SIZE:
        return f"the CUDA kernels take matrices up to n = {CUDA_MAX_SIZE}, got n = {max_size}"
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device.type}"
        if dtype not in CPU_DTYPES:
            return f"the cpu backend supports {_names(CPU_DTYPES)}, got {dtype}"
        return None
    if dtype not in GPU_DTYPES:
        return f"the {name} backend supports {_names(GPU_DTYPES)}, got {dtype}"
    if name == "triton" and _TRITON_INTERPRETED:
        if device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the triton backend runs on CPU tensors, got {device.type}"
        if not explicit:
            return "the Triton CPU interpreter is slow: it runs only when chosen by name (backend='triton')"
        return None
    if device.type != "cuda":
        hint = " (or set TRITON_INTERPRET=1 before importing symkernels)" if name == "triton" else ""
        return f"the {name} backend runs on CUDA tensors, got {device.type}{hint}"
    return None


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_name(name: object, argument: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a backend name (str), got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{argument}={name!r} is not a known backend; expected one of {list(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` (an explicit choice: it raises if it cannot serve)."""
    token = _context_choice.set(check_name(name, "name"))
    try:
        yield
    finally:
        _context_choice.reset(token)


def current_choice() -> str | None:
    """The explicit choice in force without a ``backend=`` argument (context, then environment)."""
    choice = _context_choice.get()
    if choice is not None:
        return choice
    if _ENV_CHOICE is not None:
        return check_name(_ENV_CHOICE, BACKEND_ENV_VAR)
    return None


def resolve(
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    op: str = "the op",
    max_size: int | None = None,
) -> str:
    """The backend that computes ``op`` on ``device``/``dtype`` tensors, given the ``backend=`` argument.

    ``op`` is the op's name in the ``symkernels`` namespace (e.g. ``"sinkhorn"``); ``max_size``, where the op
    takes square matrices, the largest n among them (None: not checked).

    Raises RuntimeError when an explicit choice cannot serve, naming where the choice came from and why.
    """
    if backend is not None:
        choice, source = check_name(backend), "backend"
    else:
        choice = current_choice()
        source = "use_backend()" if _context_choice.get() is not None else BACKEND_ENV_VAR
    # Every op call asks: the answers, a function of these few values, are kept (but for matrices larger
    # than the CUDA kernels take, whose answer names the size).
    # torch.compile traces the choice (and guards on what it read): no cache there, whose filling would make
    # the next call's guards fail.
    oversized = max_size is not None and max_size > CUDA_MAX_SIZE or torch.compiler.is_compiling()
    key = (choice, device.type, dtype, op)
    answer = None if oversized else _ANSWERS.get(key)
    if answer is None:
        answer = _answer(choice, device, dtype, op, max_size)
        if not oversized:
            _ANSWERS[key] = answer
    name, reason = answer
    if reason is not None:
        raise RuntimeError(f"{source}={choice!r} cannot run {op} on {device.type} {dtype} tensors: {reason}")
    return name


def _answer(
    choice: str | None, device: torch.device, dtype: torch.dtype, op: str, max_size: int | None
) -> tuple[str, str | None]:
    """``(backend, None)``, or ``(choice, why it cannot serve)`` for an explicit choice that cannot."""
    if choice is not None:
        return choice, _cannot_serve(choice, device, dtype, op, max_size, explicit=True)
    for name in BACKENDS:
        if _cannot_serve(name, device, dtype, op, max_size, explicit=False) is None:
            return name, None
    raise AssertionError("the reference backend serves every tensor")  # pragma: no cover


def backend_status() -> dict[str, BackendStatus]:
    """Every backend with whether it can be used in this process and why (not)."""
    described = {
        "cuda": "native CUDA C++ kernels (CUDA; float16/bfloat16 computed in float32, float32)",
        "triton": (
            "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1; float16/bfloat16/float32, chosen by "
            "name only)"
            if _TRITON_INTERPRETED
            else "Triton kernels (CUDA; float16/bfloat16 computed in float32, float32)"
        ),
        "cpu": "native C++ kernels (CPU; float16/bfloat16 computed in float32, float32, float64)",
        "reference": "pure PyTorch (any device, any floating dtype)",
    }
    status = {}
    for name in BACKENDS:
        reason = _UNAVAILABLE[name]
        status[name] = BackendStatus(name, reason is None, described[name] if reason is None else reason)
    return status


# Decided once, at import: the choice runs on every op call, also while torch.compile traces it.
_TRITON_PROBLEM, _TRITON_INTERPRETED = _triton_state()
_UNAVAILABLE = {name: _unavailable(name) for name in BACKENDS}
_ANSWERS: dict[tuple[str | None, str, torch.dtype, str], tuple[str, str | None]] = {}
