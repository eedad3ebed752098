"""Every CUDA source compiles for sm_80 and sm_90, on a machine without a GPU.

The library's build compiles the .cu files for the architectures of TORCH_CUDA_ARCH_LIST only (9.0 where no
GPU is visible); this compiles each of them with nvcc ``-c``, in parallel, for those of sm_80 and sm_90 that
the loaded library was not built for from these very sources (the block kernels take minutes of CPU per
architecture), so that a .cu that breaks on either never lands. It compiles as C++17, the dialect of torch
2.11's builds (the GPU machines'), where the library's build here uses torch 2.14's C++20. A success is cached
by a hash of the sources, the flags and the nvcc version: an unchanged tree costs nothing. The compiler's
resource report (registers, stack, spills per kernel) is printed with ``-s``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v", f"-I{CSRC}"]


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


def _cuda_sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def _nvcc() -> Path | None:
    from symkernels import _toolchain

    home, _ = _toolchain.find_cuda_home()
    nvcc = None if home is None else home / "bin" / "nvcc"
    return nvcc if nvcc is not None and nvcc.is_file() else None


def _key(source: Path, nvcc_version: str, flags: list[str]) -> str:
    digest = hashlib.sha256(nvcc_version.encode() + " ".join(flags).encode())
    for path in [source, *sorted(CSRC.rglob("*.h")), *sorted(CSRC.rglob("*.cuh"))]:
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _compile(nvcc: Path, source: Path, flags: list[str], stamp: Path) -> tuple[int, str, float]:
    """(exit status, compiler output, seconds); a success leaves its output in ``stamp``."""
    if stamp.is_file():
        return 0, stamp.read_text(), 0.0
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        command = [str(nvcc), "-c", *flags, "--threads", "2", str(source), "-o", f"{folder}/out.o"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(output)
    return done.returncode, output, time.monotonic() - began


def _resources(output: str) -> str:
    """ptxas's report, one line per kernel and architecture: registers, stack, spills."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if "Compiling entry function" in line:
            quoted = line.split("'")
            rows.append([f"{quoted[3]} {quoted[1]}"])
        elif rows and ("spill" in line or "Used" in line):
            rows[-1].append(line.split(":", 1)[-1].strip())
    return "\n".join("; ".join(row) for row in rows)


@pytest.fixture(scope="module")
def compiled() -> tuple[list[str], dict[str, tuple[int, str, float]]]:
    if not torch.version.cuda:
        pytest.skip("torch is a CPU-only build: the CUDA part is not built here")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) found: the CUDA part is not built here")
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    cache = Path(os.environ.get("SYMKERNELS_CACHE", Path.home() / ".cache" / "symkernels")) / "cuda-sources"
    sources = _cuda_sources()
    jobs = max(1, int(os.environ.get("MAX_JOBS", "0")) or (os.cpu_count() or 1))
    archs = [a for a in ARCHS if a not in _built_archs()]
    if not archs:
        return archs, {s.relative_to(ROOT).as_posix(): (0, "", 0.0) for s in sources}
    flags = list(FLAGS)
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    stamps = {s: cache / f"{s.stem}-{_key(s, version, flags)}" for s in sources}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            s.relative_to(ROOT).as_posix(): pool.submit(_compile, nvcc, s, flags, stamps[s]) for s in sources
        }
        return archs, {name: future.result() for name, future in futures.items()}


def test_every_cuda_source_is_compiled(compiled):
    archs, compiled = compiled
    assert sorted(compiled) == [s.relative_to(ROOT).as_posix() for s in _cuda_sources()]
    assert any("sinkhorn_cuda" in name for name in compiled), "the Sinkhorn CUDA kernels are missing"
    assert any("expansion_cuda" in name for name in compiled), "the kernel-expansion CUDA kernels are missing"


@pytest.mark.parametrize("source", [s.relative_to(ROOT).as_posix() for s in _cuda_sources()])
def test_cuda_source_compiles_for_sm80_and_sm90(compiled, source):
    archs, compiled = compiled
    status, output, seconds = compiled[source]
    assert status == 0, f"nvcc failed on {source}:\n{output[-6000:]}"
    if "__global__" in (ROOT / source).read_text():
        for arch in archs:
            assert f"for 'sm_{arch}'" in output, f"no kernel of {source} was compiled for sm_{arch}"
    when = "cached" if seconds == 0 else f"{seconds:.0f} s"
    print(f"\n{source} for sm_{', sm_'.join(archs)} (the library: the rest): {when}\n{_resources(output)}")
