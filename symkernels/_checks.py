"""Argument checks shared by the functional API and the modules: clear errors naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(tensor: torch.Tensor, name: str) -> None:
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kernel_dtype(dtype: object, name: str) -> torch.dtype:
    """The dtype of an expanded kernel: one the convolutions compute in."""
    if dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d) for d in KERNEL_DTYPES)
        raise TypeError(f"{name} must be one of {names}, got {dtype!r}")
    return dtype


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """An integer (bools refused, numpy integers accepted) of at least ``minimum``, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


def check_square_stack(tensor: torch.Tensor, name: str, *, min_dim: int = 2) -> None:
    """``[..., n, n]`` with at least ``min_dim`` dimensions."""
    if tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions [..., n, n], got shape {tuple(tensor.shape)}"
        )
    if tensor.shape[-1] != tensor.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dimensions, got shape {tuple(tensor.shape)}")


class NonFiniteInputError(ValueError):
    """An input holds NaN or Inf (a training loop reads it as divergence)."""


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteInputError` on NaN/Inf. Reads one flag from the device (a host sync): the
    functions that offer it make it an opt-in (``check_finite=True``)."""
    if torch.compiler.is_compiling():
        return  # a data-dependent branch cannot be traced; compiled callers opt out implicitly
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteInputError(
            f"{name} contains NaN or Inf (check_finite=True); without the check the output is NaN wherever "
            "the input is not finite"
        )


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; put them on one device")
    return first


def check_same_dtype(named: dict[str, torch.Tensor | None]) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in named.items() if t is not None}
    first_name, first = next(iter(dtypes.items()))
    for name, dtype in dtypes.items():
        if dtype != first:
            raise TypeError(f"{name} has dtype {dtype} but {first_name} has {first}; cast them to one dtype")
    return first


def check_expansion(
    reps: object, weight: object, kernel_size: object, *, leading_identity: object = False
) -> tuple[int, int]:
    """Validate reps ``[G, d, d]``, weight ``[C_out, C_in, d]``; returns ``(d, G_in)``."""
    reps = check_tensor(reps, "reps")
    weight = check_tensor(weight, "weight")
    k = check_positive_int(kernel_size, "kernel_size")
    if not isinstance(leading_identity, bool):
        raise TypeError(f"leading_identity must be a bool, got {type(leading_identity).__name__}")
    check_floating(reps, "reps")
    check_floating(weight, "weight")
    if reps.dim() != 3:
        raise ValueError(f"reps must have shape [G, d, d], got {tuple(reps.shape)}")
    check_square_stack(reps, "reps")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape [C_out, C_in, d], got {tuple(weight.shape)}")
    d = reps.shape[-1]
    if weight.shape[-1] != d:
        raise ValueError(f"weight's last dimension ({weight.shape[-1]}) must equal the reps' size d = {d}")
    if d % (k * k) != 0:
        raise ValueError(f"kernel_size={k}: k² = {k * k} must divide d = {d} (d = G_in·k²)")
    # (What check_same_device and check_same_dtype say, without their dictionaries: this runs on every call.)
    if weight.device != reps.device:
        raise ValueError(f"weight is on {weight.device} but reps is on {reps.device}; put them on one device")
    if weight.dtype != reps.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but reps has {reps.dtype}; cast them to one dtype")
    return d, d // (k * k)


def check_stack_list(stacks: object) -> list[torch.Tensor]:
    """A sequence of ``[G, n, n]`` floating stacks of one dtype and device (``n`` may differ), as a list."""
    if isinstance(stacks, torch.Tensor) or not isinstance(stacks, Sequence):
        raise TypeError(f"stacks must be a sequence of [G, n, n] tensors, got {type(stacks).__name__}")
    checked = []
    for index, stack in enumerate(stacks):
        name = f"stacks[{index}]"
        stack = check_tensor(stack, name)
        check_floating(stack, name)
        if stack.dim() != 3:
            raise ValueError(f"{name} must have shape [G, n, n], got {tuple(stack.shape)}")
        check_square_stack(stack, name)
        first = stacks[0]
        if stack.device != first.device or stack.dtype != first.dtype:
            raise ValueError(
                f"{name} is {stack.dtype} on {stack.device} but stacks[0] is {first.dtype} on "
                f"{first.device}; one grouped call takes stacks of one dtype and device"
            )
        checked.append(stack)
    return checked


def check_all_finite(tensors: Sequence[torch.Tensor], name: str = "stacks") -> None:
    """:func:`check_finite` of every tensor (as ``name[i]``), reading one flag from the device for all."""
    if torch.compiler.is_compiling() or not tensors:
        return
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    for index, tensor in enumerate(tensors):
        check_finite(tensor, f"{name}[{index}]")
