"""The dispatch point: explicit choices, the context manager, the environment variable, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import symkernels
from symkernels import backends


def test_reference_is_registered_and_usable():
    status = symkernels.backend_status()
    assert status["reference"].usable
    assert "reference" in backends.known_backends()


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
        with symkernels.use_backend("reference"):
            assert backends.current_choice() == "reference"
        assert backends.current_choice() == "reference"
    assert backends.current_choice() is None


def test_explicit_choice_that_cannot_serve_raises_with_the_reason(monkeypatch):
    monkeypatch.setitem(
        backends._REGISTRY,
        "picky",
        backends.Backend(
            "picky", 99, "test", None, lambda device, dtype: "only float64", {"sinkhorn": lambda *a: None}
        ),
    )
    with pytest.raises(RuntimeError, match="backend='picky' cannot run sinkhorn .*only float64"):
        symkernels.sinkhorn(torch.randn(3, 3), backend="picky")
    with (
        pytest.raises(RuntimeError, match="use_backend\\(\\)='picky' .*no expand_kernel kernel"),
        symkernels.use_backend("picky"),
    ):
        symkernels.expand_kernel(torch.rand(1, 1, 1), torch.rand(1, 1, 1), 1)
    # The automatic choice skips a backend that cannot serve instead of raising.
    torch.testing.assert_close(
        symkernels.sinkhorn(torch.eye(3)), symkernels.sinkhorn(torch.eye(3), backend="reference")
    )


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
