"""Loading the compiled library, defensively.

The library is the extension ``symkernels._C`` built ahead of time by setup.py, or, after a plain
``pip install`` whose isolated build could not see torch, the one :mod:`symkernels._jit` compiles on first
use into a cache. It is loaded at most once per process. It is refused, with the reason recorded, when it was
built against another torch than the one running (a mismatched ABI shows up as "undefined symbol" errors at
best), when the package was installed without native code, or when compiling or loading it fails. Nothing
here raises: a missing or refused library only means its kernels are unavailable and the pure-PyTorch code
serves instead.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from symkernels import _jit

__all__ = ["BUILD_INFO_FILE", "NativeStatus", "library", "native_status", "read_build_info"]

logger = logging.getLogger(__name__)

BUILD_INFO_FILE = Path(__file__).resolve().parent / "_build_info.json"
_MODULE = "symkernels._C"
_BUILD_COMMAND = "pip install --no-build-isolation -e ."
_REBUILD = f"rebuild with `{_BUILD_COMMAND}`"
# The kernels (the ops' native kernels call them; tests and benchmarks call them directly) and the hook that
# gives the ops' registered kernels their Python implementation (symkernels.ops.sinkhorn, .expansion), and
# where the CPU kernels take their threads, with the calls counted by where they ran (bench/busy_machine.py).
ENTRY_POINTS = (
    "sinkhorn_forward",
    "sinkhorn_backward",
    "expand_forward",
    "expand_backward",
    "set_python_kernel",
    "set_cpu_task_threads",
    "cpu_task_counts",
)


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native library is usable in this process, and why not."""

    loaded: bool
    cuda_built: bool  # the loaded library was compiled with its CUDA part (False when not loaded)
    reason: str | None  # None when loaded
    # _build_info.json as setup.py wrote it (with what was compiled on first use, if it was), plus "library":
    # what the library's build_info() reports once loaded.
    build_info: dict[str, Any] = field(default_factory=dict)
    # Where the library came from: built ahead of time by setup.py, or compiled on first use into a folder.
    origin: str | None = None

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


def _checked(
    module: ModuleType, name: str, record: dict[str, Any], origin: str
) -> tuple[ModuleType | None, NativeStatus]:
    """``module`` if it describes itself, was compiled against the running torch and has every kernel."""
    try:
        compiled = dict(module.build_info())
    except Exception as error:  # a library too old or too broken to describe itself is not trusted
        reason = f"{name}.build_info() failed: {type(error).__name__}: {error}; {_REBUILD}"
        logger.warning("symkernels: native library not loaded: %s", reason)
        return None, NativeStatus(False, False, reason, record, origin)
    record["library"] = compiled
    compiled_torch = compiled.get("torch_version")
    if compiled_torch is not None and compiled_torch != torch.__version__:
        # Only reachable without a build record: the library's own record is the last line of defence.
        reason = (
            f"{name} was compiled against torch {compiled_torch}, "
            f"but torch {torch.__version__} is running; {_REBUILD}"
        )
        logger.warning("symkernels: native library not used: %s", reason)
        return None, NativeStatus(False, False, reason, record, origin)

    missing = [entry for entry in ENTRY_POINTS if not hasattr(module, entry)]
    if missing:
        reason = f"{name} was built from older sources (it lacks {', '.join(missing)}); {_REBUILD}"
        logger.warning("symkernels: native library not used: %s", reason)
        return None, NativeStatus(False, False, reason, record, origin)

    cuda_built = bool(compiled.get("cuda", False))
    logger.debug("symkernels: loaded %s from %s (cuda kernels: %s)", name, origin, cuda_built)
    return module, NativeStatus(True, cuda_built, None, record, origin)


def _load_compiled_on_first_use(info: dict[str, Any]) -> tuple[ModuleType | None, NativeStatus]:
    record = dict(info)
    try:
        built = _jit.load_or_compile(info)
    except Exception as error:  # JitError, or anything the compiler toolchain throws: never fail an import
        detail = str(error) if isinstance(error, _jit.JitError) else f"{type(error).__name__}: {error}"
        why = info.get("jit_reason") or "torch was not importable when the package was built"
        reason = f"installed without its compiled library ({why}), and {detail}"
        quiet = os.environ.get(_jit.JIT_ENV_VAR, "").strip() == "0"  # turned off by request: routine
        (logger.debug if quiet else logger.warning)("symkernels: native library not loaded: %s", reason)
        return None, NativeStatus(False, False, reason, record)
    record.update(built.record)
    return _checked(
        built.module, built.module.__name__, record, f"compiled on first use into {built.directory}"
    )


def _load() -> tuple[ModuleType | None, NativeStatus]:
    info = read_build_info()
    if info is not None and info.get("native", True) and info.get("jit"):
        return _load_compiled_on_first_use(info)
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
    origin = "built ahead of time by setup.py" if info is not None else f"{_MODULE} (no build record)"
    return _checked(module, _MODULE, record, f"{origin}: {module.__file__}")


@functools.cache
def _loaded() -> tuple[ModuleType | None, NativeStatus]:
    return _load()


def native_status() -> NativeStatus:
    """Whether ``symkernels._C`` is loaded, whether it has CUDA kernels, and why not (loads on first call)."""
    return _loaded()[1]


def library() -> ModuleType | None:
    """The loaded ``symkernels._C`` module, or None when it is unavailable (see :func:`native_status`)."""
    return _loaded()[0]
