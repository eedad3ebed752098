"""A plain `pip install -e .` (pip's build isolation hides torch): the package installs without its native
library, which is compiled on first use into a cache, once, even by processes started together;
SYMKERNELS_JIT=0 forbids that and the library is reported unavailable. The fresh environment holds torch and
the core dependencies only: symkernels imports, and the command line names the extra it lacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from symkernels import _jit, _toolchain

REPO = Path(__file__).resolve().parents[2]
COMPILING = "symkernels: compiling the native library"

# Run in a fresh interpreter; prints what it found as JSON on its last line.
PROBE = r"""
import json, sys, time
start = time.perf_counter()
import torch
import symkernels
from symkernels import _native
from symkernels.info import format_info

status = _native.native_status()
imported_s = time.perf_counter() - start
logits = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(0))
found = {
    "symkernels": symkernels.__file__,
    "loaded": status.loaded,
    "reason": status.reason,
    "origin": status.origin,
    "record": status.build_info,
    "import_s": imported_s,
    "auto_backend": symkernels.backends.resolve(None, torch.device("cpu"), torch.float32),
    "info": format_info(),
}
if status.loaded:
    native = symkernels.sinkhorn(logits, 20, backend="cpu")
    reference = symkernels.sinkhorn(logits, 20, backend="reference")
    found["max_difference"] = float((native - reference).abs().max())
    found["openmp"] = status.build_info["library"]["openmp"]
print(json.dumps(found))
"""


def _env(**overrides: str) -> dict[str, str]:
    skip = (
        "PYTHONPATH",
        "SYMKERNELS_NATIVE",
        "SYMKERNELS_CUDA",
        "SYMKERNELS_JIT",
        "SYMKERNELS_CACHE",
        "VIRTUAL_ENV",
    )
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(overrides)
    return env


def _result(process: subprocess.CompletedProcess[str] | subprocess.Popen, stdout: str, stderr: str) -> dict:
    assert process.returncode == 0, stdout + stderr
    found = json.loads(stdout.strip().splitlines()[-1])
    found["stderr"] = stderr
    return found


def _probe(python: Path, cwd: Path, **env: str) -> dict:
    result = subprocess.run(
        [str(python), "-c", PROBE], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=900
    )
    return _result(result, result.stdout, result.stderr)


CORE = ("torch", "numpy")  # the package's dependencies but ninja, which pip is to install
EXTRAS = ("tqdm", "scipy", "sklearn", "matplotlib", "threadpoolctl", "mlxtend")


def _with_requirements(names: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and everything they require, transitively."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        found[key] = dist = metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _core_site_view(dst: Path) -> Path:
    """The site-packages entries of torch, numpy and what they require, as a folder of links: a view of
    this environment with the core dependencies only (no extras, no ninja, no symkernels)."""
    site = Path(torch.__file__).resolve().parents[1]
    dst.mkdir()
    for dist in _with_requirements(CORE):
        top = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for name in top:
            entry = site / name
            if entry.exists() and entry.suffix != ".pth" and not (dst / name).exists():
                (dst / name).symlink_to(entry)
    assert not any(name.lower().startswith(("ninja", "symkernels")) for name in os.listdir(dst))
    return dst


def _copy_source_tree(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json", "*.egg-info", "build")
    dst.mkdir()
    for name in ("csrc", "symkernels", "triton_kernels"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.mark.slow
def test_plain_pip_install_compiles_on_first_use(tmp_path: Path) -> None:
    # A fresh venv that sees this torch and the other core dependencies (a .pth line) and nothing else, and a
    # plain editable install: with build isolation.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "core_from_elsewhere.pth").write_text(f"{_core_site_view(tmp_path / 'core-site')}\n")
    source = _copy_source_tree(tmp_path / "src")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-e", str(source)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert (venv / "bin" / "ninja").is_file(), "pip did not install the ninja dependency"
    record = json.loads((source / "symkernels" / "_build_info.json").read_text())
    assert record["jit"] is True, record
    assert not list((source / "symkernels").glob("_C*.so"))

    # Two processes started together (torchrun-like) on an empty cache: one compiles, the other waits for it.
    cache = tmp_path / "cache"
    env = _env(SYMKERNELS_CACHE=str(cache), SYMKERNELS_CUDA="0")
    processes = [
        subprocess.Popen(
            [str(python), "-c", PROBE],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    first = [_result(process, out, err) for process, (out, err) in zip(processes, outputs, strict=True)]
    for found in first:
        assert Path(found["symkernels"]).is_relative_to(source), found["symkernels"]
        assert found["loaded"], found["reason"] + found["stderr"]
        assert found["auto_backend"] == "cpu"
        assert found["max_difference"] < 1e-5
        assert found["openmp"] is True
        assert found["record"]["cuda"] is False and found["record"]["cuda_skip_reason"] == "SYMKERNELS_CUDA=0"
        assert found["origin"].startswith(f"compiled on first use into {cache / 'jit'}"), found["origin"]
        assert "compiled on first use into" in found["info"]
    assert first[0]["origin"] == first[1]["origin"]
    compiled = [found["stderr"].count(COMPILING) for found in first]
    assert sorted(compiled) == [0, 1], [found["stderr"] for found in first]
    assert len(list((cache / "jit").iterdir())) == 1

    # A later process reuses the build without compiling.
    again = _probe(python, tmp_path, SYMKERNELS_CACHE=str(cache), SYMKERNELS_CUDA="0")
    assert again["loaded"] and again["origin"] == first[0]["origin"]
    assert COMPILING not in again["stderr"]

    # Only the core dependencies here: the probes above imported symkernels without the extras, and the
    # command line that needs them names the install to run.
    found = subprocess.run(
        [str(python), "-c", f"import importlib.util as u; print([m for m in {EXTRAS!r} if u.find_spec(m)])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]", found.stdout
    run = tmp_path / "run"
    train = subprocess.run(
        [str(venv / "bin" / "symkernels"), "train", "--quiet", "--out", str(run)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 2, train.stdout + train.stderr
    assert "install them with: pip install 'symkernels[train]'" in train.stderr, train.stderr
    assert COMPILING not in train.stderr

    # SYMKERNELS_JIT=0: nothing is compiled; the library is unavailable, with the reason; reference serves.
    empty = tmp_path / "empty-cache"
    forbidden = _probe(python, tmp_path, SYMKERNELS_CACHE=str(empty), SYMKERNELS_CUDA="0", SYMKERNELS_JIT="0")
    assert not forbidden["loaded"]
    assert "SYMKERNELS_JIT=0" in forbidden["reason"] and "--no-build-isolation" in forbidden["reason"]
    assert forbidden["auto_backend"] == "reference"
    assert COMPILING not in forbidden["stderr"]
    assert not empty.exists()
    assert "to be compiled on first use" in forbidden["info"]


def _jit_site(tmp_path: Path) -> Path:
    """A copy of the package whose build record says: compile on first use (csrc/ beside it)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    site = tmp_path / "site"
    shutil.copytree(REPO / "symkernels", site / "symkernels", ignore=ignore)
    shutil.copytree(REPO / "triton_kernels", site / "symkernels" / "triton_kernels", ignore=ignore)
    shutil.copytree(REPO / "csrc", site / "csrc")
    record = {"native": True, "jit": True, "jit_reason": "torch was not importable", "torch_version": None}
    (site / "symkernels" / "_build_info.json").write_text(json.dumps(record))
    return site


@pytest.mark.parametrize("value", ["0", "maybe"])
def test_jit_switch_off_or_malformed_reports_reason(tmp_path: Path, value: str) -> None:
    site = _jit_site(tmp_path)
    cache = tmp_path / "cache"
    found = _probe(
        Path(sys.executable), site, PYTHONPATH=str(site), SYMKERNELS_CACHE=str(cache), SYMKERNELS_JIT=value
    )
    assert Path(found["symkernels"]).is_relative_to(site)
    assert not found["loaded"]
    assert f"SYMKERNELS_JIT={value if value == '0' else repr(value)}" in found["reason"], found["reason"]
    assert found["auto_backend"] == "reference"
    assert COMPILING not in found["stderr"]
    assert not cache.exists()


def test_unwritable_cache_reports_reason(tmp_path: Path) -> None:
    site = _jit_site(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    found = _probe(Path(sys.executable), site, PYTHONPATH=str(site), SYMKERNELS_CACHE=str(blocker))
    assert not found["loaded"]
    assert "SYMKERNELS_CACHE" in found["reason"] and str(blocker) in found["reason"], found["reason"]
    assert found["auto_backend"] == "reference"


def _plan(csrc: Path, monkeypatch: pytest.MonkeyPatch) -> _toolchain.BuildPlan:
    monkeypatch.setenv("SYMKERNELS_CUDA", "0")
    return _toolchain.plan_build(torch, csrc, None, "none")


def test_cache_key_follows_sources_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    key = _jit._cache_key(_plan(csrc, monkeypatch))
    assert key == _jit._cache_key(_plan(csrc, monkeypatch))
    assert f"torch{torch.__version__}" in key and "-cpu-" in key and sys.implementation.cache_tag in key
    header = next(csrc.rglob("*.h"))
    header.write_text(header.read_text() + "\n// edited\n")
    edited = _jit._cache_key(_plan(csrc, monkeypatch))
    assert edited != key
    monkeypatch.setenv("CXX", "clang++")
    assert _jit._cache_key(_plan(csrc, monkeypatch)) != edited


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SYMKERNELS_CACHE", str(tmp_path / "mine"))
    assert _jit.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("SYMKERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _jit.cache_root() == tmp_path / "xdg" / "symkernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _jit.cache_root() == Path.home() / ".cache" / "symkernels"


def test_unfinished_build_is_not_reused(tmp_path: Path) -> None:
    """A folder with a library but no valid build.json (the build was killed) is not a finished build."""
    directory = tmp_path / "build"
    directory.mkdir()
    (directory / f"{_jit.LIBRARY_NAME}.so").write_bytes(b"half written")
    (directory / "lock").write_text("")  # torch 2.11's lock file, left by the killed build
    assert _jit._finished_build(directory) is None
    (directory / "build.json").write_text("{not json")
    assert _jit._finished_build(directory) is None
    (directory / "build.json").write_text("{}")
    assert _jit._finished_build(directory) == {}
