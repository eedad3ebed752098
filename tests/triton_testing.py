"""Helpers shared by the Triton launchers' tests (``test_sinkhorn_triton.py``, ``test_expansion_triton.py``,
``test_triton_gpu_arithmetic.py``); their ``triton_device`` fixture is in conftest.py."""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Iterator

import numpy as np
import torch


def poison(monkeypatch, module) -> None:
    """Fresh allocations of ``module`` come filled with NaN (or -7 for integers)."""

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            return out.fill_(math.nan) if out.dtype.is_floating_point else out.fill_(-7)

        return make

    monkeypatch.setattr(module.torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(module.torch, "empty_like", poisoned(torch.empty_like))


# ------------------------------------------------------------------------------------------------------------
# The GPU's approximate float32 arithmetic, in Triton's interpreter (which computes every operation correctly
# rounded in numpy). What Triton 3.6 and 3.8 compile each float32 operation to for NVIDIA GPUs (read from the
# PTX of the kernels compiled for sm_90), and the error each gets here (CUDA C Programming Guide, intrinsic
# functions):
#
#   x / y       div.full.f32                          2 ulps
#   tl.exp(x)   ex2.approx.f32 of the rounded x·log2e  the product's rounding (emulated exactly), then 2 ulps
#   tl.exp2(x)  ex2.approx.ftz.f32                     2 ulps, subnormal results flushed to 0
#   tl.log(x)   libdevice __nv_logf                    1 ulp
#
# Every result is moved by that many ulps, up or down by a hash of its operands' bits: the worst error, in
# directions that do not cancel. float64 operations, tl.math.div_rn (div.rn.f32) and additions and
# multiplications are correctly rounded on the GPU too, and stay as they are.

_LOG2E = np.float32(1.4426950408889634)


def _direction(*operands: np.ndarray) -> np.ndarray:
    """1 (up) or 0 (down) per element, a hash of the operands' float32 bits."""
    shape = np.broadcast_shapes(*(a.shape for a in operands))
    h = np.zeros(shape, dtype=np.uint32)
    for a in operands:
        bits = np.ascontiguousarray(np.broadcast_to(a.astype(np.float32), shape)).view(np.uint32)
        h = (h ^ bits) * np.uint32(2654435761)
        h ^= h >> np.uint32(15)
    return (h >> np.uint32(7)) & np.uint32(1)


def _moved(value: np.ndarray, ulps: int, up: np.ndarray) -> np.ndarray:
    """``value`` (float32) moved by ``ulps`` ulps, up where ``up`` else down; zeros, inf and NaN stay."""
    value = np.asarray(value, dtype=np.float32)
    higher, lower = value.copy(), value.copy()
    for _ in range(ulps):
        higher = np.nextafter(higher, np.float32(np.inf))
        lower = np.nextafter(lower, np.float32(-np.inf))
    moved = np.where(up == 1, higher, lower)
    return np.where(np.isfinite(value) & (value != 0), moved, value).astype(np.float32)


def _is_float32(handle) -> bool:
    scalar = handle.dtype.scalar
    return scalar.is_floating() and scalar.primitive_bitwidth == 32


@contextlib.contextmanager
def gpu_float32_arithmetic() -> Iterator[None]:
    """Triton's interpreter computes ``/``, ``tl.exp``, ``tl.exp2`` and ``tl.log`` on float32 as a GPU's
    compiled kernels do, at their documented worst error (see above), while the context lasts."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    handle = interpreter.TensorHandle

    def fdiv(self, lhs, rhs):
        if not _is_float32(lhs):
            return self.binary_op(lhs, rhs, np.divide)
        with np.errstate(all="ignore"):
            quotient = np.divide(lhs.data, rhs.data).astype(np.float32)
        return handle(_moved(quotient, 2, _direction(lhs.data, rhs.data)), lhs.dtype.scalar)

    def exp(self, arg):
        if not _is_float32(arg):
            return self.unary_op(arg, np.exp)
        with np.errstate(all="ignore"):
            product = (arg.data.astype(np.float32) * _LOG2E).astype(np.float32)  # rounded, as on the GPU
            value = np.exp2(product.astype(np.float64)).astype(np.float32)
        return handle(_moved(value, 2, _direction(arg.data)), arg.dtype.scalar)

    def exp2(self, arg):
        if not _is_float32(arg):
            return self.unary_op(arg, np.exp2)
        with np.errstate(all="ignore"):
            value = np.exp2(arg.data.astype(np.float64)).astype(np.float32)
        value = np.where(np.abs(value) < np.finfo(np.float32).tiny, np.float32(0), value)
        return handle(_moved(value, 2, _direction(arg.data)), arg.dtype.scalar)

    def log(self, arg):
        if not _is_float32(arg):
            return self.unary_op(arg, np.log)
        with np.errstate(all="ignore"):
            value = np.log(arg.data.astype(np.float64)).astype(np.float32)
        return handle(_moved(value, 1, _direction(arg.data)), arg.dtype.scalar)

    patch = {"create_fdiv": fdiv, "create_exp": exp, "create_exp2": exp2, "create_log": log}
    saved = {name: builder.__dict__[name] for name in patch}
    for name, function in patch.items():
        setattr(builder, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(builder, name, function)


@contextlib.contextmanager
def only_programs(select) -> Iterator[None]:
    """Triton's interpreter runs, of every launch, only the programs ``select(kernel name, program id)``
    picks (the others do nothing): a test of a grid too large to interpret whole runs a few programs of it,
    the first and the last among them."""
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    original = executor.__init__

    def init(self, fn, *args, **kwargs):
        original(self, fn, *args, **kwargs)
        run, name = self.fn, fn.__name__

        def some(**arguments):
            if select(name, interpreter.interpreter_builder.grid_idx[0]):
                run(**arguments)

        # With the kernel's globals (the interpreter looks for triton.language there) and its signature.
        self.fn = types.FunctionType(some.__code__, run.__globals__, name, None, some.__closure__)
        self.fn.__signature__ = inspect.signature(run)

    executor.__init__ = init
    try:
        yield
    finally:
        executor.__init__ = original
