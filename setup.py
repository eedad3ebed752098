"""Build symkernels and its native library.

The native library is compiled from csrc/ against the torch that runs it:

* ahead of time, here, when this build can import torch: ``pip install --no-build-isolation -e .`` builds the
  extension ``symkernels._C`` (the CPU kernels always; the CUDA kernels iff torch is a CUDA build *and* a CUDA
  toolkit is found; whether a GPU is visible does not matter);
* on first use, when it cannot: a plain ``pip install -e .`` builds in an isolated environment without torch
  (installing a second torch there would build against the wrong one), so the package is installed without
  the library and ``symkernels._native`` compiles it, once, against the torch that imports it.

Both ways use the same sources, flags and toolkit logic (symkernels/_toolchain.py).

Environment knobs:

``SYMKERNELS_NATIVE=0``
    no native code at all: a pure-Python install.
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
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path
from types import ModuleType

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO_FILE = ROOT / "symkernels" / "_build_info.json"


def _load_toolchain() -> ModuleType:
    # By path: the symkernels package imports torch, and is not installed yet.
    spec = importlib.util.spec_from_file_location(
        "symkernels_toolchain", ROOT / "symkernels" / "_toolchain.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


toolchain = _load_toolchain()


def _env_switch(name: str) -> bool | None:
    try:
        return toolchain.env_switch(name)
    except toolchain.ToolchainError as error:
        sys.exit(f"setup.py: {error}")


def _package_version() -> str:
    # pyproject.toml is the single source of the version; a regex keeps this working without tomllib (3.10).
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        sys.exit("setup.py: no version in pyproject.toml")
    return match.group(1)


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


def _compile_on_first_use(info: dict, error: BaseException) -> tuple[list, dict]:
    """No torch here: install without the library, and record that it is compiled on first use."""
    print(
        "setup.py: torch is not importable in this build (pip's build isolation); the native library will be "
        "compiled on first use against the installed torch (to build it now instead: "
        "pip install --no-build-isolation -e .)",
        file=sys.stderr,
    )
    info.update(
        jit=True,
        jit_reason=f"torch was not importable when the package was built ({type(error).__name__}: {error})",
        source_dir=str(ROOT / "csrc"),  # where a non-editable install finds the sources to compile
        torch_version=None,
    )
    return [], {}


def _native_build(info: dict) -> tuple[list, dict]:
    _env_switch("SYMKERNELS_CUDA")  # a malformed value fails now, whichever way the library is built
    # torch.utils.cpp_extension computes CUDA_HOME when it is imported, and guesses wrong behind a wrapper
    # nvcc: find the real root first and export it.
    cuda_home, cuda_home_note = toolchain.find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)

    try:
        import torch
    except Exception as error:  # ImportError, or a broken install's OSError
        return _compile_on_first_use(info, error)

    try:
        plan = toolchain.plan_build(torch, ROOT / "csrc", cuda_home, cuda_home_note)
    except toolchain.ToolchainError as error:
        sys.exit(f"setup.py: {error}")
    if plan.cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.cuda_arch_list

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if plan.cuda:
        extension = CUDAExtension(
            name="symkernels._C",
            sources=plan.sources,
            include_dirs=plan.include_dirs,
            extra_compile_args={"cxx": plan.cxx_flags, "nvcc": plan.nvcc_flags},
            extra_link_args=plan.link_flags,
        )
    else:
        extension = CppExtension(
            name="symkernels._C",
            sources=plan.sources,
            include_dirs=plan.include_dirs,
            extra_compile_args={"cxx": plan.cxx_flags},
            extra_link_args=plan.link_flags,
        )
    info.update(plan.record(torch))
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def main() -> None:
    info: dict = {
        "package_version": _package_version(),
        "native": _env_switch("SYMKERNELS_NATIVE") is not False,
        "jit": False,
        "cpu": False,
        "cuda": False,
        "python": platform.python_version(),
        "build_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    ext_modules, cmdclass = _native_build(info) if info["native"] else _pure_python_build(info)
    # Written before setup() so that package_data puts it into wheels as well as editable installs;
    # symkernels._native reads it to refuse a library built against another torch, or to compile one.
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
