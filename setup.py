"""Build symkernels and its native extension ``symkernels._C``.

What is compiled:

* the CPU kernels, always;
* the CUDA kernels iff torch is a CUDA build *and* a CUDA toolkit is found. Whether a GPU is visible does not
  matter: CI and container builds have none.

Build against the torch that is already installed::

    pip install --no-build-isolation -e .

Environment knobs:

``SYMKERNELS_NATIVE=0``
    no native code at all: a pure-Python install (torch is then not needed to build).
``SYMKERNELS_CUDA=0`` / ``SYMKERNELS_CUDA=1``
    never build the CUDA part / require it (the build fails with the reason when it cannot be built).
``CUDA_HOME`` or ``CUDA_PATH``
    the CUDA toolkit root; otherwise found from ``nvcc`` on PATH, then ``/usr/local/cuda``,
    ``/usr/local/cuda-*``.
``TORCH_CUDA_ARCH_LIST``
    GPU architectures, e.g. ``"9.0"`` or ``"8.0;9.0+PTX"``; default: those of the visible GPUs, else ``9.0``.
``MAX_JOBS``
    number of parallel compile jobs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO_FILE = ROOT / "symkernels" / "_build_info.json"
DEFAULT_CUDA_ARCH_LIST = "9.0"  # the H100/H200 machines this project targets

TORCH_MISSING = """
symkernels: building the native extension needs PyTorch, but `import torch` failed here:
    {error}
This happens when pip builds in an isolated environment, which has no torch. Install torch first, then build
against it without build isolation:
    pip install torch
    pip install --no-build-isolation -e .
(or set SYMKERNELS_NATIVE=0 for a pure-Python install without native kernels)
"""


def _env_switch(name: str) -> bool | None:
    """True/False when ``name`` is set to 1/0 (or yes/no, on/off), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name}={os.environ[name]!r} is not understood; use 0 or 1")


def _package_version() -> str:
    # pyproject.toml is the single source of the version; a regex keeps this working without tomllib (3.10).
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        sys.exit("setup.py: no version in pyproject.toml")
    return match.group(1)


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


def _nvcc_version(cuda_home: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else None


def _visible_gpu_arch_list(torch) -> str | None:
    """Architectures of the visible GPUs ("8.0;9.0"), or None. Used only to pick archs, never to gate CUDA."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # a broken driver must not break a build that does not need a GPU
        return None
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps)) or None


def _torch_nvidia_include_dirs(torch) -> list[str]:
    # cuBLAS/cuSPARSE/... headers that ATen's CUDA headers include ship in torch's nvidia-* wheels.
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(p) for p in nvidia.glob("cu*/include") if p.is_dir())


def _c_token(value: str) -> str | None:
    # The torch version reaches C++ as a bare -D token that the code stringifies: keep it shell- and C-safe.
    return value if re.fullmatch(r"[0-9A-Za-z.+_-]+", value) else None


def _relative_sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob(pattern))


def _packages() -> tuple[list[str], dict[str, str]]:
    # Triton kernels live in the top-level folder triton_kernels/ but install as symkernels.triton_kernels: a
    # top-level import name `triton_kernels` is already taken by other packages.
    packages = ["symkernels", *(f"symkernels.{name}" for name in find_packages(str(ROOT / "symkernels")))]
    packages += ["symkernels.triton_kernels"]
    packages += [f"symkernels.triton_kernels.{name}" for name in find_packages(str(ROOT / "triton_kernels"))]
    return packages, {"symkernels.triton_kernels": "triton_kernels"}


def _pure_python_build(info: dict) -> tuple[list, dict]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        info["torch_version"] = version("torch")
    except PackageNotFoundError:
        info["torch_version"] = None
    info["skip_reason"] = "SYMKERNELS_NATIVE=0"
    return [], {}


def _native_build(info: dict) -> tuple[list, dict]:
    want_cuda = _env_switch("SYMKERNELS_CUDA")
    # torch.utils.cpp_extension computes CUDA_HOME when it is imported, and guesses wrong behind a wrapper
    # nvcc: find the real root first and export it.
    cuda_home, cuda_home_note = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)

    try:
        import torch
    except Exception as error:  # ImportError, or a broken install's OSError
        sys.exit(TORCH_MISSING.format(error=f"{type(error).__name__}: {error}"))

    nvcc_version = None
    if want_cuda is False:
        cuda_skip = "SYMKERNELS_CUDA=0"
    elif not torch.version.cuda:
        cuda_skip = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        cuda_skip = f"no CUDA toolkit found ({cuda_home_note})"
    else:
        cuda_skip = None
        nvcc_version = _nvcc_version(cuda_home)
        # torch refuses to compile with a toolkit of another major version: say so instead of failing later.
        if nvcc_version and nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
            cuda_skip = (
                f"the CUDA toolkit at {cuda_home} is {nvcc_version}, but torch was built with CUDA "
                f"{torch.version.cuda}; point CUDA_HOME at a matching toolkit"
            )
    build_cuda = cuda_skip is None
    if want_cuda and not build_cuda:
        sys.exit(f"setup.py: SYMKERNELS_CUDA=1 but the CUDA part cannot be built: {cuda_skip}")

    arch_list = None
    if build_cuda:
        # Unset, torch's arch detection fails without a visible GPU (IndexError in torch 2.14.1).
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not arch_list:
            arch_list = _visible_gpu_arch_list(torch) or DEFAULT_CUDA_ARCH_LIST
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    defines = []
    torch_token = _c_token(torch.__version__)
    if torch_token is not None:
        defines.append(f"-DSYMKERNELS_TORCH_VERSION={torch_token}")
    # -fopenmp: cpp_extension does not add it, and without it at::parallel_for silently runs on one thread.
    # (GCC/Clang on Linux; Apple's clang has no OpenMP, so elsewhere the CPU kernels run single-threaded.)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp, *defines]
    nvcc_flags = ["-O3", "-lineinfo", *defines]
    link_flags = [*openmp]
    include_dirs = [str(ROOT / "csrc")]
    sources = _relative_sources("*.cpp")
    if build_cuda:
        cxx_flags.append("-DSYMKERNELS_WITH_CUDA")
        include_dirs += _torch_nvidia_include_dirs(torch)
        extension = CUDAExtension(
            name="symkernels._C",
            sources=sources + _relative_sources("*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            name="symkernels._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    info.update(
        torch_version=torch.__version__,
        torch_cuda_version=torch.version.cuda,
        cpu=True,
        cuda=build_cuda,
        cuda_skip_reason=cuda_skip,
        cuda_home=str(cuda_home) if cuda_home is not None else None,
        cuda_arch_list=arch_list,
        nvcc_version=nvcc_version,
        flags={"cxx": cxx_flags, "nvcc": nvcc_flags if build_cuda else [], "link": link_flags},
        max_jobs=os.environ.get("MAX_JOBS"),
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def main() -> None:
    info: dict = {
        "package_version": _package_version(),
        "native": _env_switch("SYMKERNELS_NATIVE") is not False,
        "cpu": False,
        "cuda": False,
        "python": platform.python_version(),
        "build_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ext_modules, cmdclass = _native_build(info) if info["native"] else _pure_python_build(info)
    # Written before setup() so that package_data puts it into wheels as well as editable installs;
    # symkernels._native reads it to refuse a library built against another torch.
    BUILD_INFO_FILE.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    packages, package_dir = _packages()
    setup(
        packages=packages,
        package_dir=package_dir,
        package_data={"symkernels": ["_build_info.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
