"""Compiling the native library on first use, into a cache shared by every process of the same build.

A plain ``pip install -e .`` builds in an isolated environment that cannot import torch, so the package is
installed without its library (setup.py records ``"jit": true``). The first process that needs the library
compiles csrc/ against the torch it runs, with the flags of an ahead-of-time build
(:mod:`symkernels._toolchain`), using ``torch.utils.cpp_extension.load`` and ninja, into::

    $SYMKERNELS_CACHE/jit/<key>/      (default ~/.cache/symkernels/jit/<key>)

The key names the Python ABI, the torch and CUDA versions and the GPU architectures, and ends with a hash
of the sources and flags: another torch, toolkit or source edit compiles into another folder, and an unchanged
one is reused without running the compiler. A process holds an OS file lock on the folder while it checks and
builds, so parallel processes (torchrun) compile once and the others wait and load the result; the kernel
releases the lock of a process that is killed. (torch's own lock in the build folder is a plain lock *file*
in older torch, 2.11 for one, which a killed build leaves behind and every later build then waits on
forever; under our lock it is removed.) ``build.json`` in the folder marks a finished build: a killed build
is redone by the next process.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from symkernels import _toolchain

__all__ = ["CACHE_ENV_VAR", "JIT_ENV_VAR", "JitError", "JitLibrary", "cache_root", "load_or_compile"]

JIT_ENV_VAR = "SYMKERNELS_JIT"
CACHE_ENV_VAR = "SYMKERNELS_CACHE"
LIBRARY_NAME = "symkernels_C"  # the pybind11 module's name, and the library file's stem
_MARKER = "build.json"
_ERROR_LOG = "build-error.log"
_PACKAGE_ROOT = Path(__file__).resolve().parent


class JitError(Exception):
    """The library cannot be compiled or loaded on first use; the message says why and what to do."""


@dataclass(frozen=True)
class JitLibrary:
    module: ModuleType
    directory: Path  # the cache folder the library lives in
    compiled_now: bool  # this process ran the compiler (else it reused a finished build)
    record: dict[str, Any]  # what was compiled and how (the build.json of the folder)


def cache_root() -> Path:
    """``$SYMKERNELS_CACHE``, else ``$XDG_CACHE_HOME/symkernels``, else ``~/.cache/symkernels``."""
    explicit = os.environ.get(CACHE_ENV_VAR, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "symkernels"


def _source_dir(build_record: dict[str, Any]) -> Path:
    # An editable install or a checkout has csrc/ beside the package; a wheel records where it was built from.
    candidates = [_PACKAGE_ROOT.parent / "csrc"]
    if build_record.get("source_dir"):
        candidates.append(Path(build_record["source_dir"]))
    for candidate in candidates:
        if (candidate / "register.cpp").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise JitError(
        f"the C++ sources to compile are not found (looked in {looked}); reinstall from a source checkout, "
        "or build ahead of time with `pip install --no-build-isolation -e .`"
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)


def _cache_key(plan: _toolchain.BuildPlan) -> str:
    digest = hashlib.sha256()
    for path in _toolchain.source_files(plan.csrc):
        digest.update(str(path.relative_to(plan.csrc)).encode() + b"\0" + path.read_bytes() + b"\0")
    described = [plan.cxx_flags, plan.nvcc_flags, plan.link_flags, plan.include_dirs, str(plan.cuda_home)]
    digest.update(json.dumps([described, plan.nvcc_version, os.environ.get("CXX", "")]).encode())
    device = f"cu{torch.version.cuda}-sm{plan.cuda_arch_list}" if plan.cuda else "cpu"
    return _slug(
        f"{sys.implementation.cache_tag}-torch{torch.__version__}-{device}-{digest.hexdigest()[:16]}"
    )


def _library_file(directory: Path) -> Path:
    return directory / f"{LIBRARY_NAME}.so"


def _import_library(directory: Path) -> ModuleType:
    path = _library_file(directory)
    try:
        spec = importlib.util.spec_from_file_location(LIBRARY_NAME, path)
        if spec is None or spec.loader is None:
            raise ImportError("no loader for it")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        raise JitError(
            f"loading {path} failed ({type(error).__name__}: {error}); delete {directory} to compile it again"
        ) from None
    return module


def _finished_build(directory: Path) -> dict[str, Any] | None:
    """The record of a finished build in ``directory``, or None when there is none (or it is damaged)."""
    try:
        record = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if _library_file(directory).is_file() else None


@contextlib.contextmanager
def _build_environment(plan: _toolchain.BuildPlan) -> Iterator[None]:
    """What cpp_extension reads from the environment, set for the duration of the build, then restored."""
    from torch.utils import cpp_extension

    settings: dict[str, str] = {}
    if shutil.which("ninja") is None:
        # A venv's python run without activating the venv: the ninja package's binary is not on PATH.
        with contextlib.suppress(ImportError):
            import ninja

            settings["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    if plan.cuda:
        settings["CUDA_HOME"] = str(plan.cuda_home)
        settings["TORCH_CUDA_ARCH_LIST"] = str(plan.cuda_arch_list)
    saved = {name: os.environ.get(name) for name in settings}
    saved_cuda_home = cpp_extension.CUDA_HOME
    os.environ.update(settings)
    if plan.cuda:
        # Computed when cpp_extension was imported; behind a wrapper nvcc it guesses the wrong root.
        cpp_extension.CUDA_HOME = str(plan.cuda_home)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        cpp_extension.CUDA_HOME = saved_cuda_home


def _compile(plan: _toolchain.BuildPlan, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    what = f"CPU and CUDA (archs {plan.cuda_arch_list})" if plan.cuda else "CPU"
    print(
        f"symkernels: compiling the native library ({what} kernels, torch {torch.__version__}) into "
        f"{directory}; once, a minute or more",
        file=sys.stderr,
        flush=True,
    )
    # Only a killed build leaves torch's lock file here: we hold the folder's lock, nobody else builds here.
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    root = plan.csrc.parent
    with _build_environment(plan):
        if not cpp_extension.is_ninja_available():
            raise JitError("compiling the native library needs ninja: pip install ninja")
        try:
            module = cpp_extension.load(
                name=LIBRARY_NAME,
                sources=[str(root / source) for source in plan.sources],
                extra_cflags=plan.cxx_flags,
                extra_cuda_cflags=plan.nvcc_flags,
                extra_ldflags=plan.link_flags,
                extra_include_paths=plan.include_dirs,
                build_directory=str(directory),
                with_cuda=plan.cuda,
                verbose=False,
            )
        except Exception as error:  # the compiler's errors arrive as RuntimeError, with its whole output
            log = directory / _ERROR_LOG
            with contextlib.suppress(OSError):
                log.write_text(f"{type(error).__name__}: {error}\n")
            lines = [line for line in str(error).splitlines() if line.strip()]
            last = lines[-1] if lines else type(error).__name__
            raise JitError(
                f"compiling the native library in {directory} failed ({last}); the output is in {log}"
            ) from None
    with contextlib.suppress(FileNotFoundError):
        (directory / _ERROR_LOG).unlink()
    return module


def _write_marker(directory: Path, record: dict[str, Any]) -> None:
    temporary = directory / f".{_MARKER}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, directory / _MARKER)


def load_or_compile(build_record: dict[str, Any]) -> JitLibrary:
    """The library for the running torch: from the cache when built already, else compiled now.

    Raises :class:`JitError` with the reason when compiling is forbidden (``SYMKERNELS_JIT=0``) or fails.
    """
    try:
        allowed = _toolchain.env_switch(JIT_ENV_VAR)
    except _toolchain.ToolchainError as error:
        raise JitError(str(error)) from None
    if allowed is False:
        raise JitError(
            f"compiling it on first use is turned off ({JIT_ENV_VAR}=0); build it ahead of time with "
            "`pip install --no-build-isolation -e .`"
        )
    csrc = _source_dir(build_record)
    cuda_home, cuda_home_note = _toolchain.find_cuda_home()
    try:
        plan = _toolchain.plan_build(torch, csrc, cuda_home, cuda_home_note)
    except _toolchain.ToolchainError as error:
        raise JitError(str(error)) from None
    directory = cache_root() / "jit" / _cache_key(plan)

    record = _finished_build(directory)
    if record is not None:
        return JitLibrary(_import_library(directory), directory, False, record)

    from filelock import FileLock  # a dependency of torch

    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory / "symkernels.lock"))
        with lock:
            record = _finished_build(directory)  # another process may have built it while we waited
            if record is not None:
                return JitLibrary(_import_library(directory), directory, False, record)
            module = _compile(plan, directory)
            record = {
                **plan.record(torch),
                "sources": plan.sources,
                "source_dir": str(csrc),
                "build_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_marker(directory, record)
    except OSError as error:
        raise JitError(
            f"cannot write the compile cache {directory} ({error}); set {CACHE_ENV_VAR} to a writable folder"
        ) from None
    return JitLibrary(module, directory, True, record)
