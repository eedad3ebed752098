"""Where a benchmark ran (machine, versions, commit, threads, load), and competing load to time under."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def commit() -> str:
    if os.environ.get("SYMKERNELS_COMMIT"):
        return os.environ["SYMKERNELS_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """What a reader needs to reproduce or discount a run: machine, versions, commit, load."""
    import symkernels

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "load_avg": load_average(),
        "interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "symkernels": symkernels.__version__,
        "commit": commit(),
        "backends": {name: s.usable for name, s in symkernels.backend_status().items()},
    }
    for package in ("triton", "numpy", "pot", "escnn"):
        env[package] = package_version(package)
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env["device_name"] = f"{env['cpu']} ({env['logical_cores']} logical cores)"
    return env


# ---------------------------------------------------------------------------------------------------------
# Competing load


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU for the duration of the block (to measure under contention)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if spinners else 0)  # let them get scheduled
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


def native_backends(device: str) -> list[str]:
    """The symkernels backends that run on ``device``'s kind of tensors (usable here or not)."""
    if torch.device(device).type == "cuda":
        return ["cuda", "triton"]
    return ["cpu"]


def backend_reason(name: str, device: str, op: str) -> str | None:
    """Why backend ``name`` cannot run ``op`` on float32 tensors of ``device`` (None: it can)."""
    import symkernels

    try:
        symkernels.backends.resolve(name, torch.device(device), torch.float32, op)
    except (RuntimeError, ValueError) as error:
        return str(error)
    return None
