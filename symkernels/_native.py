"""Loading the compiled library ``symkernels._C``, defensively.

The library is loaded at most once per process. It is refused, with the reason recorded, when it was built
against another torch than the one running (a mismatched ABI shows up as "undefined symbol" errors at best),
when the package was installed without native code, or when loading it fails. Nothing here raises: a missing
or refused library only means its kernels are unavailable and the pure-PyTorch code serves instead.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["BUILD_INFO_FILE", "NativeStatus", "library", "native_status", "read_build_info"]

logger = logging.getLogger(__name__)

BUILD_INFO_FILE = Path(__file__).resolve().parent / "_build_info.json"
_MODULE = "symkernels._C"
_BUILD_COMMAND = "pip install --no-build-isolation -e ."
_REBUILD = f"rebuild with `{_BUILD_COMMAND}`"
# The kernels the op families call (symkernels.ops.sinkhorn, symkernels.ops.expansion).
ENTRY_POINTS = ("sinkhorn_forward", "sinkhorn_backward", "expand_forward", "expand_backward")


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native library is usable in this process, and why not."""

    loaded: bool
    cuda_built: bool  # the loaded library was compiled with its CUDA part (False when not loaded)
    reason: str | None  # None when loaded
    # _build_info.json as setup.py wrote it, plus "library": what _C.build_info() reports once loaded.
    build_info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_cuda_kernels(self) -> bool:
        """Whether the loaded library computes the ops on CUDA tensors."""
        return self.loaded and bool(self.build_info.get("library", {}).get("cuda_kernels", False))


def read_build_info(path: Path = BUILD_INFO_FILE) -> dict[str, Any] | None:
    """The build record written by setup.py, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("symkernels: cannot read %s: %s", path, error)
        return None


def _refusal(info: dict[str, Any] | None) -> str | None:
    """Why the library must not be loaded, judged from the build record alone."""
    if info is None:
        return None  # no record (e.g. a source checkout): try the import, and check the library's own record
    if not info.get("native", True):
        return f"installed without native code ({info.get('skip_reason') or 'SYMKERNELS_NATIVE=0'})"
    built = info.get("torch_version")
    if built != torch.__version__:
        return f"built against torch {built}, but torch {torch.__version__} is running; {_REBUILD}"
    if info.get("cuda") and info.get("torch_cuda_version") != torch.version.cuda:
        return (
            f"built against CUDA {info.get('torch_cuda_version')} torch, but torch's CUDA is "
            f"{torch.version.cuda}; {_REBUILD}"
        )
    return None


def _load() -> tuple[ModuleType | None, NativeStatus]:
    info = read_build_info()
    record: dict[str, Any] = dict(info or {})
    reason = _refusal(info)
    if reason is not None:
        # Intentional (pure-Python install) is routine; a mismatch deserves attention.
        log = logger.debug if info is not None and not info.get("native", True) else logger.warning
        log("symkernels: native library not loaded: %s", reason)
        return None, NativeStatus(False, False, reason, record)

    try:
        module = importlib.import_module(_MODULE)
    except (ImportError, OSError) as error:
        if info is None and isinstance(error, ModuleNotFoundError) and error.name == _MODULE:
            reason = f"{_MODULE} is not built (no {BUILD_INFO_FILE.name}); build it with `{_BUILD_COMMAND}`"
            logger.debug("symkernels: native library not loaded: %s", reason)
        else:
            reason = f"importing {_MODULE} failed: {type(error).__name__}: {error}; {_REBUILD}"
            logger.warning("symkernels: native library not loaded: %s", reason)
        return None, NativeStatus(False, False, reason, record)

    try:
        compiled = dict(module.build_info())
    except Exception as error:  # a library too old or too broken to describe itself is not trusted
        reason = f"{_MODULE}.build_info() failed: {type(error).__name__}: {error}; {_REBUILD}"
        logger.warning("symkernels: native library not loaded: %s", reason)
        return None, NativeStatus(False, False, reason, record)
    record["library"] = compiled
    compiled_torch = compiled.get("torch_version")
    if compiled_torch is not None and compiled_torch != torch.__version__:
        # Only reachable without a build record: the library's own record is the last line of defence.
        reason = (
            f"{_MODULE} was compiled against torch {compiled_torch}, "
            f"but torch {torch.__version__} is running; {_REBUILD}"
        )
        logger.warning("symkernels: native library not used: %s", reason)
        return None, NativeStatus(False, False, reason, record)

    missing = [name for name in ENTRY_POINTS if not hasattr(module, name)]
    if missing:
        reason = f"{_MODULE} was built from older sources (it lacks {', '.join(missing)}); {_REBUILD}"
        logger.warning("symkernels: native library not used: %s", reason)
        return None, NativeStatus(False, False, reason, record)

    cuda_built = bool(compiled.get("cuda", False))
    logger.debug("symkernels: loaded %s (cuda kernels: %s)", _MODULE, cuda_built)
    return module, NativeStatus(True, cuda_built, None, record)


@functools.cache
def _loaded() -> tuple[ModuleType | None, NativeStatus]:
    return _load()


def native_status() -> NativeStatus:
    """Whether ``symkernels._C`` is loaded, whether it has CUDA kernels, and why not (loads on first call)."""
    return _loaded()[1]


def library() -> ModuleType | None:
    """The loaded ``symkernels._C`` module, or None when it is unavailable (see :func:`native_status`)."""
    return _loaded()[0]
