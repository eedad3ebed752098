"""How the ops are registered: the native library's C++ kernels (CPU, CUDA, Autograd) for the native
backends, the Python implementation for the others (and for every backend without the native library), and
what is not differentiable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import symkernels
from tests.testing import make_logits

OPS = ("symkernels::sinkhorn", "symkernels::expand_kernel")


def test_the_native_library_registers_the_ops_kernels_in_cpp():
    """A call of the native kernels crosses no Python between the caller and the kernel, either way."""
    assert symkernels.backend_status()["cpu"].usable
    for op in OPS:
        for key in ("CPU", "CUDA", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    x = make_logits(2, 4, 4).requires_grad_()
    assert symkernels.sinkhorn(x, 3).grad_fn.name() == "SinkhornBackward"
    kernel = symkernels.expand_kernel(torch.rand(2, 4, 4), torch.rand(3, 1, 4).requires_grad_(), 2)
    assert kernel.grad_fn.name() == "ExpandKernelBackward"


def test_other_choices_go_to_the_python_implementation_and_its_errors_come_back_as_they_are():
    x = make_logits(3, 4, 4).requires_grad_()
    op = torch.ops.symkernels.sinkhorn.default
    by_name, automatic = (
        op([x], 5, 1.0, 0.0, "matrix", None, "cpu"),
        op([x], 5, 1.0, 0.0, "matrix", None, "auto"),
    )
    for a, b in zip([*by_name[0], *by_name[1:]], [*automatic[0], *automatic[1:]], strict=True):
        assert torch.equal(a, b)
    grads = [torch.autograd.grad(out[0][0].square().sum(), x)[0] for out in (by_name, automatic)]
    assert torch.equal(*grads)
    with pytest.raises(ValueError, match="stop must be one of"):
        op([x], 5, 1.0, 0.0, "all", None, "cpu")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run sinkhorn on cpu"):
        op([x], 5, 1.0, 0.0, "matrix", None, "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run expand_kernel on cpu"):
        torch.ops.symkernels.expand_kernel.default(
            torch.rand(2, 4, 4), torch.rand(3, 1, 4), 2, True, False, torch.float32, "cuda"
        )


def test_a_second_derivative_raises_instead_of_passing_nothing_on():
    """The backward ops are not differentiable: a first-order gradient with create_graph=True works, its own
    gradient raises (it is not silently zero)."""
    x = make_logits(2, 4, 4, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(symkernels.sinkhorn(x, 5).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for symkernels::sinkhorn_backward is not implemented"):
        grad.sum().backward()
    reps = torch.rand(2, 4, 4, requires_grad=True)
    kernel = symkernels.expand_kernel(reps, torch.rand(3, 1, 4), 2, leading_identity=True)
    (grad,) = torch.autograd.grad(kernel.square().sum(), reps, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for symkernels::expand_kernel_backward is not"):
        grad.sum().backward()


WITHOUT_NATIVE = """
import sys
sys.modules["symkernels._C"] = None  # as if the native library were not built: import fails
import torch, symkernels
from symkernels.ops import expansion, sinkhorn
assert not symkernels._native.native_status().loaded
x = torch.randn(2, 4, 4, dtype=torch.float32, requires_grad=True)
p = symkernels.sinkhorn(x, 5, backend="triton")
q = symkernels.sinkhorn(x, 5, backend="reference")
torch.testing.assert_close(p, q)
torch.testing.assert_close(torch.autograd.grad(p.square().sum(), x), torch.autograd.grad(q.square().sum(), x))
torch.library.opcheck(torch.ops.symkernels.sinkhorn.default, ([x], 3, 1.0, 0.0, "matrix", None, "triton"))
reps = torch.rand(2, 4, 4, requires_grad=True)
weight = torch.rand(3, 1, 4, requires_grad=True)
k = symkernels.expand_kernel(reps, weight, 2, leading_identity=True, backend="triton")
r = symkernels.expand_kernel(reps, weight, 2, leading_identity=True, backend="reference")
torch.testing.assert_close(k, r)
grads = [torch.autograd.grad(kernel.square().sum(), (reps, weight)) for kernel in (k, r)]
torch.testing.assert_close(*grads)
try:
    symkernels.sinkhorn(x, 5, backend="cpu")
except RuntimeError as error:
    assert "native library not loaded" in str(error), error
else:
    raise AssertionError("backend='cpu' ran without the native library")
print("python kernels")
"""


@pytest.mark.triton
def test_without_the_native_library_the_ops_run_on_their_python_kernels():
    """Without symkernels._C the ops' CPU/CUDA kernels and autograd are registered from Python: the Triton
    kernels (in the interpreter here) still run forward and backward, equal to the reference."""
    if not symkernels.backend_status()["triton"].usable:
        pytest.skip(f"needs the triton backend: {symkernels.backend_status()['triton'].detail}")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_NATIVE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("python kernels")
