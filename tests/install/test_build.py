"""The build: what the installed native library reports, real installs without CUDA and without native code,
a plain `pip install -e .` (build isolation: the library is compiled on first use), the torch-version guard,
and the messages setup.py gives when it cannot build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symkernels import _jit, _native
from symkernels._toolchain import find_cuda_home
from symkernels.info import collect_info, format_info

REPO = Path(__file__).resolve().parents[2]
BUILD_COMMAND = "pip install --no-build-isolation -e ."

# Run in a fresh interpreter against an install in sys.path[0]; prints what it found as JSON.
PROBE = r"""
import json, sys
import torch
import symkernels
import symkernels.triton_kernels
from symkernels import _jit, _native
from symkernels._toolchain import find_cuda_home
from symkernels.info import format_info

status = _native.native_status()
p = symkernels.sinkhorn(torch.rand(2, 3, 3), 5)
print(json.dumps({
    "symkernels": symkernels.__file__,
    "triton_kernels": symkernels.triton_kernels.__file__,
    "loaded": status.loaded,
    "cuda_built": status.cuda_built,
    "reason": status.reason,
    "build": status.build_info,
    "C_imported": "symkernels._C" in sys.modules,
    "backend": symkernels.backends.resolve(None, torch.device("cpu"), torch.float32),
    "columns_sum_to_one": bool(torch.allclose(p.sum(-2), torch.ones(2, 3))),
    "info": format_info(),
}))
"""


_BUILD_ENV_VARS = ("SYMKERNELS_NATIVE", "SYMKERNELS_CUDA", "PYTHONPATH")


def _child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _BUILD_ENV_VARS}
    env.update(overrides)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _probe(site: Path) -> dict:
    result = _run([sys.executable, "-c", PROBE], cwd=site, env=_child_env(PYTHONPATH=str(site)), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # The probe must have used the install under test, not the editable checkout.
    assert Path(found["symkernels"]).is_relative_to(site), found["symkernels"]
    assert Path(found["triton_kernels"]).is_relative_to(site), found["triton_kernels"]
    assert found["columns_sum_to_one"]
    assert found["backend"] == ("cpu" if found["loaded"] else "reference")
    return found


def _copy_source_tree(dst: Path) -> Path:
    """What a clean checkout holds for building: no build products of the editable install."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json", "*.egg-info", "build")
    dst.mkdir()
    for name in ("csrc", "symkernels", "triton_kernels"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for path in REPO.iterdir():
        if path.is_file() and (
            path.name in ("setup.py", "pyproject.toml", "MANIFEST.in")
            or path.name.startswith(("README", "LICENSE"))
        ):
            shutil.copy2(path, dst / path.name)
    return dst


def _pip_install_target(source: Path, target: Path, **env: str) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    cmd = [*pip, "--no-build-isolation", "--no-deps", "--no-index", "--target", str(target), str(source)]
    result = _run(cmd, cwd=source, env=_child_env(**env), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


def _repo_build_state() -> dict[str, object]:
    info = REPO / "symkernels" / "_build_info.json"
    build_dir = REPO / "build"
    return {
        "build_info": info.read_bytes() if info.exists() else None,
        "libraries": {p.name: p.stat().st_mtime_ns for p in (REPO / "symkernels").glob("_C*.so")},
        "build_dir": sorted(str(p) for p in build_dir.rglob("*")) if build_dir.exists() else None,
    }


def test_every_source_compiles_to_its_own_object() -> None:
    """torch's build names each object after its source's folder and stem (``x.cpp`` and ``x.cu`` both give
    ``x.o``): two such sources make the CUDA build fail in ninja with "multiple rules generate"."""
    sources = sorted((REPO / "csrc").rglob("*.cpp")) + sorted((REPO / "csrc").rglob("*.cu"))
    objects: dict[Path, Path] = {}
    for source in sources:
        other = objects.setdefault(source.with_suffix(""), source)
        assert other == source, f"{other.relative_to(REPO)} and {source.relative_to(REPO)} make one object"


def test_installed_build_has_cpu_part() -> None:
    if os.environ.get("SYMKERNELS_NATIVE") == "0":
        pytest.skip("installed with SYMKERNELS_NATIVE=0: no native library by request")
    status = _native.native_status()
    assert status.loaded, status.reason
    compiled = _native.library().build_info()
    assert compiled["cpu"] is True
    if sys.platform.startswith("linux"):
        assert compiled["openmp"] is True, "compiled without -fopenmp: at::parallel_for would use one thread"
    assert compiled["torch_version"] == torch.__version__
    assert status.build_info["torch_version"] == torch.__version__
    assert all(hasattr(_native.library(), name) for name in _native.ENTRY_POINTS)


def test_cuda_part_built_when_toolkit_and_cuda_torch() -> None:
    missing = [
        why
        for why, absent in [
            ("no nvcc on PATH", shutil.which("nvcc") is None),
            ("torch is not a CUDA build", not torch.version.cuda),
            ("SYMKERNELS_CUDA=0", os.environ.get("SYMKERNELS_CUDA") == "0"),
            ("SYMKERNELS_NATIVE=0", os.environ.get("SYMKERNELS_NATIVE") == "0"),
        ]
        if absent
    ]
    if missing:
        pytest.skip(f"the CUDA part is not expected here: {', '.join(missing)}")
    status = _native.native_status()
    assert status.loaded, status.reason
    assert status.cuda_built, f"CUDA part not built: {status.build_info.get('cuda_skip_reason')}"
    assert status.build_info["library"]["cuda_archs"], status.build_info


@pytest.mark.slow
def test_install_without_cuda_part(tmp_path: Path) -> None:
    before = _repo_build_state()
    source = _copy_source_tree(tmp_path / "src")
    site = tmp_path / "site"
    _pip_install_target(source, site, SYMKERNELS_CUDA="0")
    assert list((site / "symkernels").glob("_C*.so")), sorted(p.name for p in (site / "symkernels").iterdir())

    found = _probe(site)
    assert found["loaded"], found["reason"]
    assert found["cuda_built"] is False
    assert found["C_imported"]
    assert found["build"]["cuda"] is False
    assert found["build"]["cuda_skip_reason"] == "SYMKERNELS_CUDA=0"
    assert found["build"]["library"]["cuda"] is False
    assert "CUDA kernels: no" in found["info"]
    # Built ahead of time, not on first use: --no-build-isolation sees the installed torch.
    assert found["build"]["jit"] is False
    assert "built ahead of time by setup.py" in found["info"], found["info"]
    assert _repo_build_state() == before, "installing a copy changed the checkout's build products"


def test_pure_python_install(tmp_path: Path) -> None:
    source = _copy_source_tree(tmp_path / "src")
    site = tmp_path / "site"
    _pip_install_target(source, site, SYMKERNELS_NATIVE="0")
    assert not list((site / "symkernels").glob("_C*.so"))

    found = _probe(site)
    assert not found["loaded"]
    assert "SYMKERNELS_NATIVE=0" in found["reason"]
    assert not found["C_imported"]
    assert "native library" in found["info"] and "not loaded" in found["info"]


def test_library_built_for_another_torch_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "symkernels", site / "symkernels", ignore=ignore)  # with the built _C, if any
    shutil.copytree(REPO / "triton_kernels", site / "symkernels" / "triton_kernels", ignore=ignore)
    record = _native.read_build_info() or {"native": True, "cpu": True, "cuda": False}
    # jit off: a record of a plain `pip install -e .` would otherwise send the probe to compile on first use.
    record = {**record, "jit": False, "torch_version": "0.0.0+other"}
    (site / "symkernels" / "_build_info.json").write_text(json.dumps(record))

    found = _probe(site)
    assert not found["loaded"]
    assert "0.0.0+other" in found["reason"] and torch.__version__ in found["reason"]
    assert BUILD_COMMAND in found["reason"]
    assert not found["C_imported"], "the mismatched library was imported before being refused"


def _copy_setup(dst: Path) -> None:
    """What setup.py needs to run: itself, the version, and the toolchain module it loads by path."""
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, dst / name)
    (dst / "symkernels").mkdir()
    shutil.copy2(REPO / "symkernels" / "_toolchain.py", dst / "symkernels" / "_toolchain.py")


def test_setup_without_torch_records_compile_on_first_use(tmp_path: Path) -> None:
    # What pip's build isolation does: run setup.py where `import torch` fails.
    _copy_setup(tmp_path)
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    result = _run([sys.executable, "-c", code], cwd=tmp_path, env=_child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiled on first use" in result.stderr, result.stderr
    assert BUILD_COMMAND in result.stderr, result.stderr
    record = json.loads((tmp_path / "symkernels" / "_build_info.json").read_text())
    assert record["native"] is True and record["jit"] is True
    assert record["torch_version"] is None and record["cpu"] is False
    assert "torch was not importable" in record["jit_reason"]
    assert record["source_dir"] == str(tmp_path / "csrc")


def test_setup_requiring_cuda_without_toolkit_fails_clearly(tmp_path: Path) -> None:
    _copy_setup(tmp_path)
    env = _child_env(SYMKERNELS_CUDA="1", CUDA_HOME=str(tmp_path / "no-cuda"))
    result = _run([sys.executable, "setup.py", "--version"], cwd=tmp_path, env=env, timeout=120)
    assert result.returncode != 0
    assert "SYMKERNELS_CUDA=1 but the CUDA part cannot be built" in result.stderr, result.stderr
    assert not (tmp_path / "symkernels" / "_build_info.json").exists()


def _fake_toolkit(root: Path, release: str = "12.9") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_setup_refuses_toolkit_of_another_cuda_major(tmp_path: Path) -> None:
    if not torch.version.cuda:
        pytest.skip("torch is not a CUDA build: the toolkit is never used")
    other_major = int(torch.version.cuda.split(".")[0]) + 1
    toolkit = _fake_toolkit(tmp_path / "cuda", release=f"{other_major}.0")
    _copy_setup(tmp_path)
    env = _child_env(SYMKERNELS_CUDA="1", CUDA_HOME=str(toolkit))
    result = _run([sys.executable, "setup.py", "--version"], cwd=tmp_path, env=env, timeout=120)
    assert result.returncode != 0
    assert f"is {other_major}.0.1, but torch was built with CUDA {torch.version.cuda}" in result.stderr, (
        result.stderr
    )


@pytest.mark.parametrize("how", ["wrapper", "symlink"])
def test_setup_finds_toolkit_behind_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    toolkit = _fake_toolkit(tmp_path / "cuda-12.9")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    if how == "wrapper":
        nvcc.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    else:
        nvcc.symlink_to(toolkit / "bin" / "nvcc")
    nvcc.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    root, how_found = find_cuda_home()
    assert root == toolkit.resolve(), how_found


def test_info_reports_native_status_and_backends() -> None:
    info = collect_info()
    status = _native.native_status()
    assert info["native"]["loaded"] == status.loaded
    assert info["torch"] == torch.__version__
    assert "reference" in info["backends"]
    text = format_info()
    assert "native library" in text
    assert "backend reference" in text
    if not status.loaded:
        assert status.reason in text
    elif status.build_info.get("jit"):
        assert f"compiled on first use into {_jit.cache_root() / 'jit'}" in text
    else:
        assert "built ahead of time by setup.py" in text and str(status.origin) in text
