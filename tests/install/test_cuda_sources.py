"""Every CUDA source compiles for sm_80 and sm_90, on a machine without a GPU.

The library's build compiles the .cu files for the architectures of TORCH_CUDA_ARCH_LIST only (9.0 where no
GPU is visible); this compiles each of them with nvcc ``-c``, in parallel, for those of sm_80 and sm_90 that
the loaded library was not built for from these very sources (the block kernels take minutes of CPU per
architecture), so that a .cu that breaks on either never lands. It compiles as C++17, the dialect of torch
2.11's builds (the GPU machines'), where the library's build here uses torch 2.14's C++20. A success is cached
by a hash of the sources, the flags and the nvcc version (shared with ``bench/cuda_resources.py``, which
compiles the same way): an unchanged tree costs nothing. The compiler's resource report (registers, stack,
spills per kernel) is printed with ``-s``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench.cuda_resources import ARCHS, Compiled, compile_sources, cuda_sources, find_nvcc, parse_resources

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def _built_archs() -> set[str]:
    """The architectures ("90") the loaded library's CUDA part was compiled for, if built after every source
    in csrc/ changed (else none: a stale build proves nothing)."""
    from symkernels import _native

    status = _native.native_status()
    module = _native.library()
    if not status.has_cuda_kernels or module is None:
        return set()
    newest = max(p.stat().st_mtime for p in CSRC.rglob("*") if p.is_file())
    if Path(module.__file__).stat().st_mtime < newest:
        return set()
    listed = str(status.build_info.get("cuda_arch_list") or "").replace(",", ";").replace(" ", ";")
    return {a.removesuffix("+PTX").replace(".", "") for a in listed.split(";") if a}


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[Compiled]]:
    """Each source's compiles for the architectures the library was not built for (maybe none)."""
    if not torch.version.cuda:
        pytest.skip("torch is a CPU-only build: the CUDA part is not built here")
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) found: the CUDA part is not built here")
    archs = [a for a in ARCHS if a not in _built_archs()]
    by_source: dict[str, list[Compiled]] = {s.relative_to(ROOT).as_posix(): [] for s in cuda_sources()}
    for result in compile_sources(nvcc, archs) if archs else []:
        by_source[result.source].append(result)
    return by_source


def test_every_cuda_source_is_compiled(compiled):
    assert sorted(compiled) == [s.relative_to(ROOT).as_posix() for s in cuda_sources()]
    assert any("sinkhorn_cuda" in name for name in compiled), "the Sinkhorn CUDA kernels are missing"
    assert any("expansion_cuda" in name for name in compiled), "the kernel-expansion CUDA kernels are missing"


@pytest.mark.parametrize("source", [s.relative_to(ROOT).as_posix() for s in cuda_sources()])
def test_cuda_source_compiles_for_sm80_and_sm90(compiled, source):
    for result in compiled[source]:
        assert result.status == 0, f"nvcc failed on {source} for sm_{result.arch}:\n{result.output[-6000:]}"
        kernels = parse_resources(result)
        if "__global__" in (ROOT / source).read_text():
            assert kernels, f"no kernel of {source} was compiled for sm_{result.arch}"
        when = "cached" if result.seconds == 0 else f"{result.seconds:.0f} s"
        print(f"\n{source} for sm_{result.arch}: {when}")
        for k in kernels:
            spilled = k.spill_store_bytes
            print(f"  {k.kernel}: {k.registers} registers, {k.stack_bytes} B stack, {spilled} B spilled")


PTXAS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN10symkernels14expansion_cuda21expand_forward_kernelILb1EEEvNS0_13ExpansionArgsEii' for 'sm_90'
ptxas info    : Function properties for _ZN10symkernels14expansion_cuda21expand_forward_kernelILb1EEEvNS0_13ExpansionArgsEii
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 291.797 ms
ptxas info    : Compiling entry function '_Z3sumv' for 'sm_90'
ptxas info    : Function properties for _Z3sumv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""  # noqa: E501


def test_resources_are_read_from_the_ptxas_report():
    kernels = parse_resources(Compiled("csrc/x.cu", "90", 0, PTXAS_REPORT, 0.0))
    assert [(k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes) for k in kernels] == [
        (64, 8, 8, 4),
        (32, 0, 0, 0),
    ]
    assert [(k.static_shared_bytes, k.barriers, k.arch) for k in kernels] == [(1024, 1, "90"), (0, 0, "90")]
    if shutil.which("c++filt"):
        assert kernels[0].kernel.startswith("void symkernels::expansion_cuda::expand_forward_kernel<true>(")
