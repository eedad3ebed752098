"""The one choice of backend: explicit choices, the context manager, the environment variable, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import symkernels
from symkernels import backends


def test_every_backend_is_reported_and_the_reference_is_usable():
    status = symkernels.backend_status()
    assert list(status) == list(backends.BACKENDS)
    assert status["reference"].usable
    assert all(s.detail for s in status.values())


def test_automatic_choice_for_cpu_tensors():
    cpu = torch.device("cpu")
    expected = "cpu" if symkernels.backend_status()["cpu"].usable else "reference"
    assert backends.resolve(None, cpu, torch.float32) == expected
    assert backends.resolve(None, cpu, torch.float64) == expected
    # Triton's interpreter serves CPU tensors only when asked for by name; meta tensors only the reference.
    assert backends.resolve(None, torch.device("meta"), torch.float32) == "reference"


def test_explicit_reference_matches_automatic():
    logits = torch.randn(2, 5, 5)
    torch.testing.assert_close(symkernels.sinkhorn(logits, backend="reference"), symkernels.sinkhorn(logits))


def test_unknown_backend_name_raises_everywhere():
    logits = torch.randn(5, 5)
    with pytest.raises(ValueError, match="backend='nope' is not a known backend"):
        symkernels.sinkhorn(logits, backend="nope")
    with pytest.raises(ValueError, match="not a known backend"):
        symkernels.expand_kernel(torch.rand(2, 4, 4), torch.rand(1, 1, 4), 2, backend="nope")
    with pytest.raises(ValueError, match="name='nope'"), symkernels.use_backend("nope"):
        pass
    with pytest.raises(TypeError, match="backend must be a backend name"):
        symkernels.sinkhorn(logits, backend=3)


def test_context_manager_nests_and_restores():
    assert backends.current_choice() is None
    with symkernels.use_backend("reference"):
        assert backends.current_choice() == "reference"
        with symkernels.use_backend("cpu"):
            assert backends.current_choice() == "cpu"
        assert backends.current_choice() == "reference"
    assert backends.current_choice() is None


def test_explicit_choice_that_cannot_serve_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run sinkhorn on meta .*CPU tensors"):
        symkernels.sinkhorn(torch.rand(3, 3, device="meta"), backend="cpu", check_finite=False)
    with (
        pytest.raises(RuntimeError, match=r"use_backend\(\)='cuda' cannot run expand_kernel on cpu"),
        symkernels.use_backend("cuda"),
    ):
        symkernels.expand_kernel(torch.rand(1, 1, 1), torch.rand(1, 1, 1), 1)
    if symkernels.backend_status()["triton"].usable:
        with pytest.raises(RuntimeError, match="float16, bfloat16, float32"):
            symkernels.sinkhorn(torch.rand(3, 3, dtype=torch.float64), backend="triton")


def test_the_op_refuses_the_reference_with_a_pointer_to_it():
    """The reference is not an op implementation: the op says where it is instead."""
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.ops.symkernels.sinkhorn([torch.rand(1, 3, 3)], 2, 1.0, 0.0, "matrix", None, "reference")


def _run_with_env(value: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYMKERNELS_BACKEND=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_and_validates():
    code = (
        "import torch, symkernels; print(symkernels.backends.current_choice()); "
        "symkernels.sinkhorn(torch.eye(2))"
    )
    ok = _run_with_env("reference", code)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "reference"
    bad = _run_with_env("fastest", code)
    assert bad.returncode != 0
    assert "SYMKERNELS_BACKEND='fastest' is not a known backend" in bad.stderr
