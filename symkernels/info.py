"""What this installation is: versions, what was compiled, which backends are usable and why not.

``symkernels info`` and ``python -m symkernels.info`` print :func:`format_info`.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

from symkernels import _native
from symkernels.backends import backend_status

__all__ = ["collect_info", "format_info"]


def _package_version() -> str:
    try:
        return metadata.version("symkernels")
    except metadata.PackageNotFoundError:  # e.g. a source tree on PYTHONPATH
        record = _native.read_build_info() or {}
        return str(record.get("package_version", "unknown"))


def _triton() -> dict[str, Any]:
    try:
        import triton
    except Exception as error:  # ImportError, or a broken install failing on import
        return {"available": False, "version": None, "reason": f"{type(error).__name__}: {error}"}
    return {"available": True, "version": getattr(triton, "__version__", "unknown"), "reason": None}


def _gpus() -> list[dict[str, Any]]:
    try:
        if not torch.cuda.is_available():
            return []
        return [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": "{}.{}".format(*torch.cuda.get_device_capability(i)),
            }
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # a broken driver is reported as no GPU rather than crashing `symkernels info`
        return []


def collect_info() -> dict[str, Any]:
    """Versions, GPUs, native library status and build record, and backend status, as plain data."""
    status = _native.native_status()
    return {
        "symkernels": _package_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton(),
        "gpus": _gpus(),
        "native": {
            "loaded": status.loaded,
            "cuda_built": status.cuda_built,
            "cuda_kernels": status.has_cuda_kernels,
            "reason": status.reason,
            "origin": status.origin,
        },
        "build": status.build_info,
        "backends": {name: {"usable": s.usable, "detail": s.detail} for name, s in backend_status().items()},
    }


def _yes_no(flag: object) -> str:
    return "yes" if flag else "no"


def format_info(info: dict[str, Any] | None = None) -> str:
    """:func:`collect_info` as aligned, human-readable lines."""
    info = collect_info() if info is None else info
    triton = info["triton"]
    gpus = info["gpus"]
    native = info["native"]
    build = info["build"]
    library = build.get("library", {})

    gpu_line = "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']})" for g in gpus)
    rows: list[tuple[str, str]] = [
        ("symkernels", info["symkernels"]),
        ("python", f"{info['python']} ({info['platform']})"),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU-only build'})"),
        ("triton", triton["version"] if triton["available"] else f"unavailable ({triton['reason']})"),
        ("GPUs", gpu_line or "none visible"),
    ]
    if native["loaded"]:
        archs = ", ".join(library.get("cuda_archs", [])) or "-"
        cuda = _yes_no(native["cuda_kernels"])
        native_line = (
            f"loaded (CPU kernels: yes, CUDA kernels: {cuda}, CUDA part compiled: "
            f"{_yes_no(native['cuda_built'])}, CUDA archs: {archs})"
        )
    else:
        native_line = f"not loaded: {native['reason']}"
    rows.append(("native library", native_line))
    if native.get("origin"):
        rows.append(("  from", native["origin"]))
    if build.get("jit") and not build.get("torch_version"):
        # Installed without torch in sight (pip's build isolation), and not compiled (yet): see the reason.
        rows.append(("built", f"not yet: to be compiled on first use ({build.get('jit_reason')})"))
    elif build:
        when, against = build.get("build_time", "?"), build.get("torch_version", "?")
        rows.append(("built", f"{when} against torch {against}"))
        if build.get("native"):
            cuda = "yes" if build.get("cuda") else f"no ({build.get('cuda_skip_reason')})"
            rows.append(("  CUDA part", cuda))
            if build.get("cuda"):
                rows.append(("  nvcc", f"{build.get('nvcc_version')} at {build.get('cuda_home')}"))
                rows.append(("  TORCH_CUDA_ARCH_LIST", str(build.get("cuda_arch_list"))))
            flags = build.get("flags", {})
            rows.append(("  cxx flags", " ".join(flags.get("cxx", []))))
            if flags.get("nvcc"):
                rows.append(("  nvcc flags", " ".join(flags["nvcc"])))
            rows.append(("  OpenMP", _yes_no(library.get("openmp")) if library else "?"))
    else:
        rows.append(("built", "no build record (_build_info.json)"))
    for name, backend in info["backends"].items():
        state = "usable" if backend["usable"] else "unavailable"
        rows.append((f"backend {name}", f"{state}: {backend['detail']}"))

    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


if __name__ == "__main__":
    print(format_info())
