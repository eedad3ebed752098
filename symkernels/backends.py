"""The one dispatch point: which backend computes an op.

A backend is chosen per call, in this order of precedence:

1. the ``backend=`` argument of a functional op,
2. the innermost :func:`use_backend` context,
3. the ``SYMKERNELS_BACKEND`` environment variable (read once, at import),
4. automatically: the fastest registered backend that can serve the inputs (a backend may serve some inputs
   only when chosen explicitly, e.g. Triton's slow CPU interpreter).

An explicitly chosen backend that cannot serve the inputs raises with the reason; it never falls back
silently. Backends register themselves with :func:`register_backend` when their code can be loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from symkernels import reference

BACKEND_ENV_VAR = "SYMKERNELS_BACKEND"

# Returns None when the backend can serve tensors on this device/dtype, else the reason it cannot.
ServeCheck = Callable[[torch.device, torch.dtype], "str | None"]


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # higher is preferred by the automatic choice
    description: str
    unavailable_reason: str | None  # None when loaded and usable
    can_serve: ServeCheck
    ops: Mapping[str, Callable[..., torch.Tensor]]  # op name -> implementation
    # The check of the automatic choice when it is stricter than can_serve (None: can_serve).
    auto_can_serve: ServeCheck | None = None


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    detail: str


_REGISTRY: dict[str, Backend] = {}
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "symkernels_backend", default=None
)


def register_backend(
    name: str,
    *,
    priority: int,
    description: str,
    can_serve: ServeCheck,
    ops: Mapping[str, Callable[..., torch.Tensor]],
    unavailable_reason: str | None = None,
    auto_can_serve: ServeCheck | None = None,
) -> None:
    """Make ``name`` selectable. ``unavailable_reason`` marks a backend that exists but cannot load here;
    ``auto_can_serve``, when given, replaces ``can_serve`` for the automatic choice (inputs it refuses are
    served only on an explicit choice)."""
    _REGISTRY[name] = Backend(
        name, priority, description, unavailable_reason, can_serve, dict(ops), auto_can_serve
    )


def known_backends() -> tuple[str, ...]:
    """Registered backend names, preferred first."""
    return tuple(b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority))


def backend_status() -> dict[str, BackendStatus]:
    """Every registered backend with whether it can be used in this process and why (not)."""
    status = {}
    for name in known_backends():
        backend = _REGISTRY[name]
        if backend.unavailable_reason is None:
            status[name] = BackendStatus(name, True, backend.description)
        else:
            status[name] = BackendStatus(name, False, backend.unavailable_reason)
    return status


def _check_name(name: object, argument: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a backend name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(
            f"{argument}={name!r} is not a known backend; expected one of {list(known_backends())}"
        )
    return name


def _read_env_choice() -> str | None:
    value = os.environ.get(BACKEND_ENV_VAR, "").strip()
    return value or None


_ENV_CHOICE = _read_env_choice()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` (an explicit choice: it raises if it cannot serve)."""
    token = _context_choice.set(_check_name(name, "name"))
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
        return _check_name(_ENV_CHOICE, BACKEND_ENV_VAR)
    return None


def resolve(
    op: str, backend: str | None, device: torch.device, dtype: torch.dtype
) -> Callable[..., torch.Tensor]:
    """The implementation of ``op`` that runs on tensors of ``device``/``dtype``.

    Raises when an explicitly chosen backend cannot serve, naming where the choice came from.
    """
    if backend is not None:
        source = "backend"
        choice = _check_name(backend, "backend")
    else:
        choice = current_choice()
        source = "use_backend()" if _context_choice.get() is not None else BACKEND_ENV_VAR
    if choice is not None:
        chosen = _REGISTRY[choice]
        reason = chosen.unavailable_reason or _serve_reason(chosen, op, device, dtype)
        if reason is not None:
            raise RuntimeError(
                f"{source}={choice!r} cannot run {op} on {device.type} {dtype} tensors: {reason}"
            )
        return chosen.ops[op]
    for name in known_backends():
        candidate = _REGISTRY[name]
        if (
            candidate.unavailable_reason is None
            and _serve_reason(candidate, op, device, dtype, auto=True) is None
        ):
            return candidate.ops[op]
    raise RuntimeError(f"no backend can run {op} on {device.type} {dtype} tensors")


def _serve_reason(
    backend: Backend, op: str, device: torch.device, dtype: torch.dtype, *, auto: bool = False
) -> str | None:
    if op not in backend.ops:
        return f"the {backend.name} backend has no {op} kernel"
    check = backend.auto_can_serve if auto and backend.auto_can_serve is not None else backend.can_serve
    return check(device, dtype)


def _reference_can_serve(device: torch.device, dtype: torch.dtype) -> str | None:
    return None  # pure PyTorch runs wherever PyTorch does


register_backend(
    "reference",
    priority=0,
    description="pure PyTorch (any device, any floating dtype)",
    can_serve=_reference_can_serve,
    ops={
        "sinkhorn": reference.sinkhorn_reference,
        "representation_stack": reference.representation_stack_reference,
        "expand_kernel": reference.expand_kernel_reference,
    },
)
