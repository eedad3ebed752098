"""What the compiler gives each CUDA kernel: registers, stack, spills, static shared memory and barriers.

    python bench/cuda_resources.py [--archs 80 90] [--out bench/results/cuda-resources.md]

Compiles every ``csrc/**/*.cu`` with ``nvcc -c -Xptxas -v`` for each architecture (no GPU needed; the block
Sinkhorn kernels take minutes of CPU per architecture) and tabulates ptxas's report per kernel, in Markdown
(``--out``) and JSON (the same path with ``.json``). A compile's output is cached by a hash of the sources,
the flags and the nvcc version, shared with ``tests/install/test_cuda_sources.py``, which compiles the same
way.
Dynamic shared memory is chosen at launch (per n for the Sinkhorn block kernels) and is not in this report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
# C++17: the dialect of torch 2.11's builds (the GPU machines'); the library's build here uses C++20.
FLAGS = ("-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v", f"-I{CSRC}")
DEFAULT_OUT = ROOT / "bench" / "results" / "cuda-resources.md"

# `python bench/cuda_resources.py` puts bench/, not the repository root, on the path.
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Compiled:
    source: str  # relative to the repository root
    arch: str
    status: int
    output: str
    seconds: float  # 0 when cached


@dataclass(frozen=True)
class KernelResources:
    source: str
    arch: str
    kernel: str  # demangled
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_shared_bytes: int
    barriers: int


def cuda_sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def find_nvcc() -> Path | None:
    from symkernels import _toolchain

    home, _ = _toolchain.find_cuda_home()
    nvcc = None if home is None else home / "bin" / "nvcc"
    return nvcc if nvcc is not None and nvcc.is_file() else None


def _key(source: Path, nvcc_version: str, flags: Sequence[str]) -> str:
    digest = hashlib.sha256(nvcc_version.encode() + " ".join(flags).encode())
    for path in [source, *sorted(CSRC.rglob("*.h")), *sorted(CSRC.rglob("*.cuh"))]:
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _compile_one(nvcc: Path, source: Path, arch: str, flags: list[str], stamp: Path) -> Compiled:
    name = source.relative_to(ROOT).as_posix()
    if stamp.is_file():
        return Compiled(name, arch, 0, stamp.read_text(), 0.0)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        command = [str(nvcc), "-c", *flags, "--threads", "2", str(source), "-o", f"{folder}/out.o"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(output)
    return Compiled(name, arch, done.returncode, output, time.monotonic() - began)


def nvcc_version(nvcc: Path) -> str:
    from symkernels import _toolchain

    return _toolchain.nvcc_version(nvcc.parent.parent) or "unknown"


def compile_sources(nvcc: Path, archs: Sequence[str], jobs: int | None = None) -> list[Compiled]:
    """Every CUDA source compiled for every arch of ``archs``, in parallel (``jobs``: default MAX_JOBS, else
    the CPU count); cached successes cost nothing."""
    version = nvcc_version(nvcc)
    cache = Path(os.environ.get("SYMKERNELS_CACHE", Path.home() / ".cache" / "symkernels")) / "cuda-sources"
    jobs = jobs or max(1, int(os.environ.get("MAX_JOBS", "0")) or (os.cpu_count() or 1))
    work = []
    for source in cuda_sources():
        for arch in archs:
            flags = [*FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            work.append(
                (source, arch, flags, cache / f"{source.stem}-sm{arch}-{_key(source, version, flags)}")
            )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_compile_one, nvcc, *item) for item in work]
        return [future.result() for future in futures]


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = done.stdout.splitlines()
    return lines if done.returncode == 0 and len(lines) == len(names) else names


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    return int(match.group(1)) if match else 0


def parse_resources(compiled: Compiled) -> list[KernelResources]:
    """ptxas's report of one compile, one entry per kernel."""
    blocks: list[tuple[str, str]] = []  # (mangled name, its report lines)
    for line in compiled.output.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_\d+'", line)
        if entry:
            blocks.append((entry.group(1), ""))
        elif blocks and ("spill" in line or "Used" in line):
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + " " + line)
    names = _demangle([name for name, _ in blocks])
    return [
        KernelResources(
            source=compiled.source,
            arch=compiled.arch,
            kernel=name,
            registers=_number(r"Used (\d+) registers", text),
            stack_bytes=_number(r"(\d+) bytes stack frame", text),
            spill_store_bytes=_number(r"(\d+) bytes spill stores", text),
            spill_load_bytes=_number(r"(\d+) bytes spill loads", text),
            static_shared_bytes=_number(r"(\d+) bytes smem", text),
            barriers=_number(r"used (\d+) barriers", text),
        )
        for name, (_, text) in zip(names, blocks, strict=True)
    ]


def _short(kernel: str) -> str:
    """The kernel's name without namespaces and parameter list, with its template arguments."""
    name = re.sub(r"\(.*\)$", "", kernel)
    return re.sub(r"\bsymkernels::\w+::", "", name)


def markdown(rows: list[KernelResources], nvcc_version: str, commit: str) -> str:
    lines = [
        "# CUDA kernels: what the compiler gives them",
        "",
        f"Command: `python bench/cuda_resources.py`; nvcc: {nvcc_version}; flags: `{' '.join(FLAGS[:-1])}`;",
        f"commit {commit}. Static shared memory only: the dynamic shared memory of a launch is chosen by the",
        "host code.",
        "",
        "| source | kernel | arch | registers | stack (B) | spill stores / loads (B) | static smem (B) "
        "| barriers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.source, r.kernel, r.arch)):
        source = Path(r.source).name
        lines.append(
            f"| {source} | `{_short(r.kernel)}` | sm_{r.arch} | {r.registers} | {r.stack_bytes} | "
            f"{r.spill_store_bytes} / {r.spill_load_bytes} | {r.static_shared_bytes} | {r.barriers} |"
        )
    spilled = [r for r in rows if r.spill_store_bytes or r.spill_load_bytes]
    lines += ["", f"{len(rows)} kernel builds; {len(spilled)} with spills."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--archs", nargs="+", default=list(ARCHS), help="compute capabilities (default: 80 90)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the Markdown report (and .json beside it)"
    )
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_resources: no CUDA toolkit (nvcc) found", file=sys.stderr)
        return 2
    compiled = compile_sources(nvcc, args.archs)
    failed = [c for c in compiled if c.status != 0]
    for c in failed:
        print(f"nvcc failed on {c.source} for sm_{c.arch}:\n{c.output[-4000:]}", file=sys.stderr)
    if failed:
        return 1
    from bench.environment import commit

    rows = [row for c in compiled for row in parse_resources(c)]
    version, sha = nvcc_version(nvcc), commit()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, version, sha))
    kernels = [asdict(r) for r in rows]
    record = {"nvcc": version, "flags": list(FLAGS[:-1]), "commit": sha, "kernels": kernels}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({len(rows)} kernel builds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
