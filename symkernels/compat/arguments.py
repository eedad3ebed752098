"""Checks of the published modules' constructor arguments: clear errors, and the one documented fallback.

The published modules accept these arguments without checking them, so a mistake surfaces later, deep inside
a forward (an unknown ``init_mode`` leaves ``representations`` unset; ``n_iter=0`` never stops the Sinkhorn
loop; the default ``device="cuda"`` fails on a machine without a GPU). Here each one is checked where it is
given, with a message that names it.
"""

from __future__ import annotations

import numbers
import warnings

import torch

INIT_MODES = ("rand", "kaiming_uniform")
PADDING_MODES = ("same", "valid")

__all__ = [
    "INIT_MODES",
    "PADDING_MODES",
    "check_flag",
    "check_init_mode",
    "check_padding",
    "check_tolerance",
    "resolve_device",
]


def resolve_device(device: object, *, stacklevel: int = 4) -> torch.device | None:
    """The device the parameters are created on.

    ``None`` is torch's default device. A CUDA device on a machine where CUDA is unavailable falls back to
    the CPU with a warning (the published default is ``"cuda"``: a script that relies on it runs on the CPU
    unchanged); a CUDA index that does not exist is an error. ``stacklevel``: the warning's, so that it points
    at the caller's constructor call.
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device must be a torch.device, a device string or None, got {device!r}") from error
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} but CUDA is not available here: the parameters are created on the CPU "
            "(pass device='cpu' to silence this warning)",
            UserWarning,
            stacklevel=stacklevel,
        )
        return torch.device("cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return resolved


def check_init_mode(init_mode: object) -> str:
    if init_mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
    return init_mode  # type: ignore[return-value]


def check_flag(value: object, name: str) -> bool:
    """A bool, or the integers 0 and 1 (configuration files pass flags as integers)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool (or 0/1), got {value!r}")


def check_padding(padding: object) -> int | tuple[int, int] | str:
    """What ``torch.nn.functional.conv2d`` accepts: an int >= 0, a pair of them, ``"same"`` or ``"valid"``."""
    if isinstance(padding, str) and padding in PADDING_MODES:
        return padding
    if _is_size(padding):
        return int(padding)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(_is_size(v) for v in padding):
        return (int(padding[0]), int(padding[1]))
    raise ValueError(
        f"padding must be an int >= 0, a pair of them or one of {PADDING_MODES}, got {padding!r}"
    )


def _is_size(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_tolerance(tol: object) -> float | None:
    """``None`` (a fixed number of iterations) or a finite number >= 0."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= float(tol) < float("inf"):
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
    return float(tol)
