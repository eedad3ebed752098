"""How the native library is compiled: sources, CUDA toolkit, architectures and flags.

One plan for both ways the library is built: ahead of time by setup.py (``pip install --no-build-isolation``)
and on first use by :mod:`symkernels._native` (after a plain ``pip install``, whose isolated build cannot see
torch). setup.py loads this file by path, before the package exists, so it imports nothing from symkernels and
only the standard library at module level; torch is passed in by the caller.

The CUDA part is compiled iff torch is a CUDA build *and* a CUDA toolkit of the same major version is found;
whether a GPU is visible does not matter. ``SYMKERNELS_CUDA=0/1`` skips it / requires it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_CUDA_ARCH_LIST = "9.0"  # the H100/H200 machines this project targets


class ToolchainError(Exception):
    """The build cannot be planned as asked (a malformed switch, or a CUDA part required but impossible)."""


def env_switch(name: str) -> bool | None:
    """True/False when ``name`` is set to 1/0 (or yes/no, on/off), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ToolchainError(f"{name}={os.environ[name]!r} is not understood; use 0 or 1")


def _is_toolkit_root(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def _root_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit root behind an ``nvcc`` found on PATH: a symlink, the real binary, or a wrapper script."""
    real = Path(nvcc).resolve()
    if _is_toolkit_root(real.parent.parent):
        return real.parent.parent
    # A wrapper such as /usr/local/bin/nvcc containing `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: the real
    # binary is megabytes, a wrapper is a few lines.
    try:
        if real.stat().st_size > 64 * 1024:
            return None
        text = real.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    for match in re.finditer(r"""\bexec\s+["']?([^\s"']*/nvcc)\b""", text):
        target = Path(match.group(1)).resolve()
        if target != real and _is_toolkit_root(target.parent.parent):
            return target.parent.parent
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name))


def find_cuda_home() -> tuple[Path | None, str]:
    """The CUDA toolkit root and how it was found (or why none was)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            root = Path(value)
            if (root / "bin" / "nvcc").is_file():
                return root, f"{var}={value}"
            return None, f"{var}={value} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = _root_from_nvcc(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc})"
    candidates = [Path("/usr/local/cuda")]
    candidates += sorted(Path("/usr/local").glob("cuda-*"), key=_version_key, reverse=True)
    for root in candidates:
        if _is_toolkit_root(root):
            return root, f"found at {root}"
    where = f"nvcc on PATH is {nvcc}, with no toolkit behind it" if nvcc else "no nvcc on PATH"
    return None, f"{where}; no CUDA_HOME/CUDA_PATH; nothing at /usr/local/cuda*"


def nvcc_version(cuda_home: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else None


def visible_gpu_arch_list(torch: ModuleType) -> str | None:
    """Architectures of the visible GPUs ("8.0;9.0"), or None. Used only to pick archs, never to gate CUDA."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # a broken driver must not break a build that does not need a GPU
        return None
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps)) or None


def _torch_nvidia_include_dirs(torch: ModuleType) -> list[str]:
    # cuBLAS/cuSPARSE/... headers that ATen's CUDA headers include ship in torch's nvidia-* wheels.
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(p) for p in nvidia.glob("cu*/include") if p.is_dir())


def _c_token(value: str) -> str | None:
    # The torch version reaches C++ as a bare -D token that the code stringifies: keep it shell- and C-safe.
    return value if re.fullmatch(r"[0-9A-Za-z.+_-]+", value) else None


@dataclass(frozen=True)
class BuildPlan:
    """What to compile and how; ``sources`` are relative to ``csrc.parent`` (the source tree's root)."""

    csrc: Path
    sources: list[str]  # the C++ sources, plus the CUDA sources when cuda is set
    cuda: bool
    cuda_skip_reason: str | None
    cuda_home: Path | None
    cuda_arch_list: str | None  # TORCH_CUDA_ARCH_LIST to compile with (cuda only)
    nvcc_version: str | None
    cxx_flags: list[str]
    nvcc_flags: list[str]
    link_flags: list[str]
    include_dirs: list[str] = field(default_factory=list)

    def record(self, torch: ModuleType) -> dict[str, Any]:
        """What the build record (``_build_info.json``) and ``symkernels info`` report about this plan."""
        return {
            "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda,
            "cpu": True,
            "cuda": self.cuda,
            "cuda_skip_reason": self.cuda_skip_reason,
            "cuda_home": str(self.cuda_home) if self.cuda_home is not None else None,
            "cuda_arch_list": self.cuda_arch_list,
            "nvcc_version": self.nvcc_version,
            "flags": {
                "cxx": self.cxx_flags,
                "nvcc": self.nvcc_flags if self.cuda else [],
                "link": self.link_flags,
            },
            "max_jobs": os.environ.get("MAX_JOBS"),
        }


def _relative_sources(csrc: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(csrc.parent)) for p in csrc.rglob(pattern))


def plan_build(torch: ModuleType, csrc: Path, cuda_home: Path | None, cuda_home_note: str) -> BuildPlan:
    """The build of the sources in ``csrc`` against ``torch``, with the toolkit :func:`find_cuda_home` found.

    Raises :class:`ToolchainError` when ``SYMKERNELS_CUDA`` is malformed, or is 1 and the CUDA part cannot be
    built. The architectures come from ``TORCH_CUDA_ARCH_LIST``, else the visible GPUs, else
    :data:`DEFAULT_CUDA_ARCH_LIST`.
    """
    want_cuda = env_switch("SYMKERNELS_CUDA")
    version = None
    if want_cuda is False:
        cuda_skip = "SYMKERNELS_CUDA=0"
    elif not torch.version.cuda:
        cuda_skip = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        cuda_skip = f"no CUDA toolkit found ({cuda_home_note})"
    else:
        cuda_skip = None
        version = nvcc_version(cuda_home)
        # torch refuses to compile with a toolkit of another major version: say so instead of failing later.
        if version and version.split(".")[0] != torch.version.cuda.split(".")[0]:
            cuda_skip = (
                f"the CUDA toolkit at {cuda_home} is {version}, but torch was built with CUDA "
                f"{torch.version.cuda}; point CUDA_HOME at a matching toolkit"
            )
    build_cuda = cuda_skip is None
    if want_cuda and not build_cuda:
        raise ToolchainError(f"SYMKERNELS_CUDA=1 but the CUDA part cannot be built: {cuda_skip}")

    arch_list = None
    if build_cuda:
        # Unset, torch's arch detection fails without a visible GPU (IndexError in torch 2.14.1).
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        arch_list = arch_list or visible_gpu_arch_list(torch) or DEFAULT_CUDA_ARCH_LIST

    defines = []
    torch_token = _c_token(torch.__version__)
    if torch_token is not None:
        defines.append(f"-DSYMKERNELS_TORCH_VERSION={torch_token}")
    # -fopenmp: cpp_extension does not add it, and without it at::parallel_for silently runs on one thread.
    # (GCC/Clang on Linux; Apple's clang has no OpenMP, so elsewhere the CPU kernels run single-threaded.)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp, *defines]
    nvcc_flags = ["-O3", "-lineinfo", *defines]
    include_dirs = [str(csrc)]
    sources = _relative_sources(csrc, "*.cpp")
    if build_cuda:
        cxx_flags.append("-DSYMKERNELS_WITH_CUDA")
        include_dirs += _torch_nvidia_include_dirs(torch)
        sources += _relative_sources(csrc, "*.cu")
    return BuildPlan(
        csrc=csrc,
        sources=sources,
        cuda=build_cuda,
        cuda_skip_reason=cuda_skip,
        cuda_home=cuda_home,
        cuda_arch_list=arch_list,
        nvcc_version=version,
        cxx_flags=cxx_flags,
        nvcc_flags=nvcc_flags if build_cuda else [],
        link_flags=[*openmp],
        include_dirs=include_dirs,
    )


def source_files(csrc: Path) -> list[Path]:
    """Every file the native library is compiled from (sources and headers), in a stable order."""
    return sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"))
