"""The Triton Sinkhorn kernels: P and its exact gradient against the reference for every kernel layout
(packed, chunked, multi-program), both domains (scaling, log fallback), grouped launches of mixed sizes, the
public API's backend choice, opcheck and torch.compile.

Runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported, see conftest.py; CPU
tensors, tiny shapes, fp32/fp16) or on a GPU; the ``cuda`` cases add the paper's sizes up to n = 784, T up to
50, bf16, NaN-poisoned buffers and a compiled training step.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import symkernels
from symkernels import backends
from symkernels.reference import sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits, non_contiguous

pytest.importorskip("triton")

from symkernels.ops import triton_sinkhorn as ts  # noqa: E402

pytestmark = pytest.mark.triton


# Tuning overrides that send small matrices through each kernel layout (BN = 8 for n = 5..8: the chunked
# kernel walks 2 chunks of 4 rows, the stepped one 2 programs of 2 tiles of 2 rows).
LAYOUTS = {
    "packed": {},
    "chunked": {"packed_max_n": 1, "chunk_elements": 32},
    "stepped": {"packed_max_n": 1, "fused_max_n": 1, "stepped_elements": 16, "stepped_slab_rows": 4},
}


def rounded(logits64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 values the kernel sees in ``dtype`` (so input rounding is not counted as error)."""
    return logits64.to(dtype).to(torch.float64)


def check_against_reference(
    logits64: torch.Tensor,
    n_iter: int,
    tau: float,
    dtype: torch.dtype,
    device: torch.device,
    *,
    layout: str = "packed",
    prepare=lambda x: x,
) -> None:
    """P and the gradient of the logits at least as accurate (vs float64) as the same-dtype reference (all
    computed on ``device``: the reference is plain PyTorch)."""
    logits64 = rounded(logits64, dtype).to(device).requires_grad_()
    truth = sinkhorn_reference(logits64, n_iter, tau)
    grad = rounded(make_logits(*truth.shape, dtype=torch.float64, seed=11), dtype).to(device)
    (truth_grad,) = torch.autograd.grad(truth, logits64, grad)

    low = logits64.detach().to(dtype).requires_grad_()
    expected = sinkhorn_reference(low, n_iter, tau)
    (expected_grad,) = torch.autograd.grad(expected, low, grad.to(dtype))

    x = low.detach().clone().requires_grad_()
    with ts.tuning(**LAYOUTS[layout]):
        p = ts.triton_sinkhorn(prepare(x), n_iter, tau)
        (got_grad,) = torch.autograd.grad(p, x, grad.to(dtype))
    assert p.shape == truth.shape and p.dtype == dtype and p.device == device
    assert got_grad.shape == x.shape and got_grad.dtype == dtype
    assert_as_accurate_as_reference(p.detach().cpu(), expected.detach().cpu(), truth.detach().cpu())
    assert_as_accurate_as_reference(got_grad.cpu(), expected_grad.cpu(), truth_grad.cpu())


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 16, 25, 36])
def test_matches_reference_for_each_size(n, dtype, device):
    check_against_reference(make_logits(3, n, n, dtype=torch.float64, seed=n), 3, 1.0, dtype, device)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n_iter", [1, 3, 20])
def test_matches_reference_for_iterations_and_temperature(n_iter, tau, device):
    logits = make_logits(4, 5, 5, dtype=torch.float64, scale=2.0, seed=n_iter)
    check_against_reference(logits, n_iter, tau, torch.float32, device)


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["scaling-domain", "log-domain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_kernel_layout_matches_reference(layout, dtype, scale, device):
    logits = make_logits(2, 7, 7, dtype=torch.float64, scale=scale, seed=3)
    check_against_reference(logits, 3, 1.0, dtype, device, layout=layout)


def run_forward(logits: torch.Tensor, n_iter: int, tau: float):
    """``(p, cols, domain)`` straight from the fused op for a ``[B, n, n]`` stack."""
    meta, _ = ts._layout(((logits.shape[0], logits.shape[-1]),), logits.device, None)
    return ts._fused_forward_op(logits.reshape(-1), meta, logits.shape[-1], n_iter, tau)


@pytest.mark.parametrize("layout", ["packed", "chunked"])
def test_each_matrix_chooses_its_domain(layout, device):
    """Logits spread beyond MAX_SPREAD within a row go to the log domain, matrix by matrix (here within one
    program), and both kinds stay as accurate as the reference."""
    logits = make_logits(3, 6, 6, dtype=torch.float64, seed=5)
    logits[1] *= 2 * ts.MAX_SPREAD  # a spread of a few hundred
    logits[2, 0, 0] = logits[2, 0].min() + ts.MAX_SPREAD + 1  # only just beyond, in one row
    with ts.tuning(**LAYOUTS[layout]):
        _, cols, domain = run_forward(logits.float().to(device), 3, 1.0)
    assert domain.tolist() == [0, 1, 1]
    assert cols.shape == (3, 3, 6) and bool(torch.isfinite(cols).all())
    check_against_reference(logits, 3, 1.0, torch.float32, device, layout=layout)


@pytest.mark.parametrize("layout", ["packed", "chunked"])
def test_scalings_leaving_their_range_fall_back_to_the_log_domain(layout, device, monkeypatch):
    """A scaling outside [scale_lo, scale_hi] (normally e^±64) sends the matrix to the log domain."""
    logits = make_logits(2, 5, 5, dtype=torch.float64, seed=6)
    monkeypatch.setattr(ts, "_SCALE_HI", 1.0)  # c_1 = 1 / colsum of a row-stochastic iterate exceeds 1
    with ts.tuning(**LAYOUTS[layout]):
        _, _, domain = run_forward(logits.float().to(device), 3, 1.0)
    assert domain.tolist() == [1, 1]
    check_against_reference(logits, 3, 1.0, torch.float32, device, layout=layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_zero_one_leading_dims_and_strides(layout, device):
    check_against_reference(make_logits(1, 6, 6, dtype=torch.float64, seed=7), 2, 1.0, torch.float32, device)
    check_against_reference(
        make_logits(2, 2, 5, 5, dtype=torch.float64, seed=8), 2, 0.5, torch.float32, device, layout=layout
    )
    check_against_reference(
        make_logits(2, 6, 6, dtype=torch.float64, seed=9),
        2,
        1.0,
        torch.float32,
        device,
        layout=layout,
        prepare=non_contiguous,
    )
    empty = torch.zeros(0, 4, 4, device=device, requires_grad=True)
    with ts.tuning(**LAYOUTS[layout]):
        p = ts.triton_sinkhorn(empty, 3, 1.0)
        p.sum().backward()
    assert p.shape == (0, 4, 4) and empty.grad.shape == (0, 4, 4)


def poisoned_outputs_check(n: int, layout: dict, device: torch.device, monkeypatch) -> None:
    """Every allocation of the ops starts as NaN (or -7): P, the saved scalings, the domains and the gradient
    must all be written, for a log-domain matrix among scaling-domain ones."""

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            return out.fill_(math.nan) if out.dtype.is_floating_point else out.fill_(-7)

        return make

    logits = make_logits(3, n, n, scale=2.0, seed=n).to(device)
    logits[1] *= 30.0
    flat = logits.reshape(-1)
    with ts.tuning(**layout):
        stepped = n > ts.current_tuning().fused_max_n
        meta, programs = ts._layout(((3, n),), device, ts._stepped_rows(n)[1] if stepped else None)
        monkeypatch.setattr(ts.torch, "empty", poisoned(torch.empty))
        monkeypatch.setattr(ts.torch, "empty_like", poisoned(torch.empty_like))
        if stepped:
            p, cols, domain = ts._stepped_forward_op(flat, meta, programs, n, 5, 1.0)
            grad = ts._stepped_backward_op(torch.ones_like(p), flat, meta, programs, cols, n, 1.0)
        else:
            p, cols, domain = ts._fused_forward_op(flat, meta, n, 5, 1.0)
            grad = ts._fused_backward_op(torch.ones_like(p), flat, meta, cols, domain, n, 1.0)
        monkeypatch.undo()
    for tensor in (p, cols, grad):
        assert bool(torch.isfinite(tensor).all())
    assert set(domain.tolist()) <= {0, 1} and domain[1].item() == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_poisoned_outputs_fully_written(layout, device, monkeypatch):
    poisoned_outputs_check(7, LAYOUTS[layout], device, monkeypatch)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy, on the NaN row
def test_non_finite_logits_make_only_their_matrix_nan(device):
    logits = make_logits(2, 4, 4, seed=10)
    logits[0, 1, 2] = float("nan")
    p = ts.triton_sinkhorn(logits.to(device), 3, 1.0).cpu()
    assert bool(torch.isnan(p[0]).all())
    torch.testing.assert_close(p[1], sinkhorn_reference(logits[1], 3, 1.0))


@pytest.mark.parametrize("stepped", [False, True], ids=["fused", "fused+stepped"])
def test_grouped_mixed_sizes_match_each_stack(stepped, device):
    """One grouped call over stacks of different n equals the reference per stack, gradients included."""
    sizes = [(3, 2), (2, 5), (1, 7), (2, 3)]
    stacks64 = [make_logits(g, n, n, dtype=torch.float64, scale=2.0, seed=n) for g, n in sizes]
    stacks = [s.float().to(device).requires_grad_() for s in stacks64]
    grads = [make_logits(*s.shape, seed=20 + i) for i, s in enumerate(stacks)]
    layout = {"fused_max_n": 5, "stepped_elements": 16, "stepped_slab_rows": 4} if stepped else {}
    with ts.tuning(**layout):
        outputs = ts.triton_grouped_sinkhorn(stacks, 4, 0.7)
        got_grads = torch.autograd.grad(outputs, stacks, [g.to(device) for g in grads])
    for s64, out, grad, got_grad in zip(stacks64, outputs, grads, got_grads, strict=True):
        x = s64.float().requires_grad_()
        expected = sinkhorn_reference(x, 4, 0.7)
        (expected_grad,) = torch.autograd.grad(expected, x, grad)
        assert out.shape == s64.shape
        torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad.cpu(), expected_grad, rtol=1e-5, atol=1e-6)


def test_grouped_call_is_one_launch_each_way(device, monkeypatch):
    """Stacks of sizes 3, 5 and 36 (one packed launch: BN = 64) and 100 with 9 (one chunked launch)."""
    launches = []
    wrap = ts.wrap_triton

    def counting(kernel):
        launches.append(kernel.fn.__name__)
        return wrap(kernel)

    monkeypatch.setattr(ts, "wrap_triton", counting)
    for sizes, kind in (([3, 5, 36], "packed"), ([9, 100], "chunked")):
        launches.clear()
        stacks = [make_logits(2, n, n, seed=n).to(device).requires_grad_() for n in sizes]
        outputs = ts.triton_grouped_sinkhorn(stacks, 2, 1.0)
        torch.autograd.grad(sum(o.square().sum() for o in outputs), stacks)
        assert launches == [f"{kind}_forward_kernel", f"{kind}_backward_kernel"]


def test_public_api_serves_cpu_tensors_only_when_asked_for(device):
    logits = make_logits(3, 5, 5, seed=12).to(device)
    torch.testing.assert_close(
        symkernels.sinkhorn(logits, 4, backend="triton").cpu(), sinkhorn_reference(logits.cpu(), 4)
    )
    with symkernels.use_backend("triton"):
        stack = symkernels.representation_stack(logits, 4)
    assert stack.shape == (4, 5, 5)
    torch.testing.assert_close(stack[0].cpu(), torch.eye(5))
    torch.testing.assert_close(stack[1:].cpu(), sinkhorn_reference(logits.cpu(), 4))
    status = symkernels.backend_status()["triton"]
    assert status.usable and ("interpreter" in status.detail) == ts.INTERPRETED
    automatic = backends.resolve("sinkhorn", None, logits.device, logits.dtype)
    assert (automatic is ts.triton_sinkhorn) == (device.type == "cuda")
    with pytest.raises(RuntimeError, match="float16, bfloat16 and float32"):
        symkernels.sinkhorn(logits.double(), backend="triton")


PLAIN_CPU = textwrap.dedent(
    """
    import torch, symkernels
    from symkernels.ops import triton_sinkhorn
    assert not triton_sinkhorn.INTERPRETED
    try:
        symkernels.sinkhorn(torch.eye(3), backend="triton")
    except RuntimeError as error:
        print("dispatch:", error)
    try:
        triton_sinkhorn.triton_sinkhorn(torch.eye(3))
    except ValueError as error:
        print("direct:", error)
    print("automatic:", symkernels.backends.resolve("sinkhorn", None, torch.device("cpu"), torch.float32))
    status = symkernels.backend_status()["triton"]
    print("status:", status.usable, status.detail)
    """
)


def test_cpu_tensors_without_the_interpreter_are_a_clear_error():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_CPU], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert "backend='triton' cannot run sinkhorn on cpu" in lines["dispatch"]
    assert "TRITON_INTERPRET=1" in lines["dispatch"]
    assert "must be a CUDA tensor" in lines["direct"] and "TRITON_INTERPRET=1" in lines["direct"]
    assert "triton" not in lines["automatic"]
    # Without a GPU the backend says it cannot be used, and why.
    if not torch.cuda.is_available():
        assert lines["status"].startswith("False no CUDA device is visible")
        assert "TRITON_INTERPRET=1" in lines["status"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: ts.triton_sinkhorn(torch.rand(2, 3, 3, dtype=torch.float64)), TypeError, "float64"),
        (lambda: ts.triton_sinkhorn(torch.ones(2, 3, 3, dtype=torch.int64)), TypeError, "int64"),
        (lambda: ts.triton_sinkhorn(torch.rand(3, 4)), ValueError, "square"),
        (lambda: ts.triton_sinkhorn(torch.rand(2, 0, 0)), ValueError, "n >= 1"),
        (lambda: ts.triton_sinkhorn(torch.rand(3, 3), n_iter=0), ValueError, "n_iter must be >= 1"),
        (lambda: ts.triton_sinkhorn(torch.rand(3, 3), tau=-1.0), ValueError, "tau must be"),
        (lambda: ts.triton_grouped_sinkhorn(torch.rand(2, 3, 3)), TypeError, "sequence of"),
        (lambda: ts.triton_grouped_sinkhorn([torch.rand(3, 3)]), ValueError, r"stacks\[0\] must have shape"),
        (lambda: ts.triton_grouped_sinkhorn([torch.rand(1, 0, 0)]), ValueError, "n >= 1"),
        (
            lambda: ts.triton_grouped_sinkhorn([torch.rand(1, 3, 3), torch.rand(1, 2, 2).half()]),
            ValueError,
            r"stacks\[1\] is torch.float16",
        ),
        (lambda: ts.Tuning(packed_max_n=0), ValueError, "packed_max_n must be >= 1"),
        (lambda: ts.tuning(unknown=1).__enter__(), TypeError, "unknown"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.smoke
def test_opcheck(device):
    x = make_logits(3 * 25 + 2 * 9, seed=13).to(device).requires_grad_()
    shapes = ((3, 5), (2, 3))
    meta, _ = ts._layout(shapes, x.device, None)
    p, cols, domain = ts._fused_forward_op(x.detach(), meta, 5, 3, 1.0)
    torch.library.opcheck(torch.ops.symkernels.triton_sinkhorn_fused_forward.default, (x, meta, 5, 3, 1.0))
    torch.library.opcheck(
        torch.ops.symkernels.triton_sinkhorn_fused_backward.default,
        (torch.randn_like(p), x.detach(), meta, cols, domain, 5, 1.0),
    )
    with ts.tuning(**LAYOUTS["stepped"]):
        meta, programs = ts._layout(shapes, x.device, ts._stepped_rows(5)[1])
        p, cols, _ = ts._stepped_forward_op(x.detach(), meta, programs, 5, 2, 1.0)
        torch.library.opcheck(
            torch.ops.symkernels.triton_sinkhorn_stepped_forward.default,
            (x, meta, programs, 5, 2, 1.0),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
        torch.library.opcheck(
            torch.ops.symkernels.triton_sinkhorn_stepped_backward.default,
            (torch.randn_like(p), x.detach(), meta, programs, cols, 5, 1.0),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph_matches_eager(device):
    stacks = [make_logits(3, n, n, seed=n).to(device).requires_grad_() for n in (4, 9)]

    def loss(a, b):
        first, second = ts.triton_grouped_sinkhorn([a, b], 3, 1.0)
        return (first * first.log()).sum() + second.square().sum()

    # The interpreter's ops are opaque to the compiler: aot_eager checks their fake and autograd registration.
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    eager_value = loss(*stacks)
    eager_grads = torch.autograd.grad(eager_value, stacks)
    value = compiled(*stacks)
    grads = torch.autograd.grad(value, stacks)
    torch.testing.assert_close(value, eager_value)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


AOT_COMPILE = textwrap.dedent(
    """
    import os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from symkernels.ops import triton_sinkhorn as ts
    from symkernels.triton_kernels import sinkhorn as F, sinkhorn_stepped as S

    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    tuning = ts.current_tuning()

    def compile(fn, pointers, constexprs, warps):
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
        source = ASTSource(fn, signature, constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr
        spills = [int(s) for s in re.findall(r"(\\d+) bytes spill stores", report)]
        print(fn.__name__, constexprs, "spill stores", spills)

    ptr = "*fp32"
    floats = dict(tau="fp32", max_spread="fp32", scale_lo="fp32", scale_hi="fp32")
    vectors = dict(cols_ptr="*fp64", domain_ptr="*i32", meta_ptr="*i64")
    common = dict(x_ptr=ptr, k_ptr="*fp32", p_ptr=ptr, **vectors, **floats)
    backward = dict(common, grad_ptr=ptr, out_ptr=ptr, bars_ptr="*fp32", partials_ptr="*fp32")
    stepped = dict(backward, maxima_ptr="*fp64", sums_ptr="*fp32", programs_ptr="*i64")
    def split(plan):
        return {k: v for k, v in plan.items() if k != "num_warps"}, plan["num_warps"]

    for n in (16, tuning.packed_max_n):
        for dtype in ("fp32", "bf16"):
            ptrs = dict(x_ptr="*" + dtype, p_ptr="*" + dtype, grad_ptr="*" + dtype, out_ptr="*" + dtype)
            compile(F.packed_forward_kernel, dict(common, **ptrs), *split(ts.packed_plan(n, 1 << 20)))
            compile(F.packed_backward_kernel, dict(backward, **ptrs), *split(ts.packed_plan(n, 1 << 20)))
    n = tuning.fused_max_n
    compile(F.chunked_forward_kernel, common, *split(ts.chunked_plan(n, backward=False)))
    compile(F.chunked_backward_kernel, backward, *split(ts.chunked_plan(n, backward=True)))
    for kernel in (S.stepped_forward_step_kernel, S.stepped_forward_final_kernel,
                   S.stepped_backward_step_kernel, S.stepped_backward_final_kernel):
        compile(kernel, stepped, *split(ts.stepped_plan(784)))
    print("compiled")
    """
)


# The default tuning is spill-free with triton 3.8's code generation. Triton 3.6 (the GPU machines' version)
# allocates registers differently: ptxas reports 72 bytes of spill stores in the packed backward at n = 64,
# and other block shapes move the spills elsewhere rather than removing them, on one version or the other.
SPILL_FREE_FROM_TRITON = (3, 8)


@pytest.mark.smoke
@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The interpreter accepts code the GPU compiler rejects: compile every kernel at its default tuning for
    sm_90 without a GPU, and check that ptxas allocates it without spilling registers (on the triton versions
    the tuning was made for; on older ones every kernel must still compile)."""
    import triton
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    reports = re.findall(r"spill stores \[([\d, ]*)\]", result.stdout)
    assert len(reports) == 14, result.stdout
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < SPILL_FREE_FROM_TRITON:
        return
    for line, report in zip(result.stdout.splitlines(), reports, strict=False):
        assert all(int(s) == 0 for s in report.split(",") if s.strip()), line


# GPU cases: the paper's sizes and beyond (n up to 784, T up to 50), bf16, poisoned buffers, compiled step.

GPU_SIZES = [25, 49, 100, 196, 392, 784]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_iter", [1, 20, 50])
@pytest.mark.parametrize("n", GPU_SIZES)
def test_gpu_parity_matrix(n, n_iter, dtype, gpu):
    check_against_reference(make_logits(3, n, n, dtype=torch.float64, seed=n), n_iter, 1.0, dtype, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [49, 196, 392])
def test_gpu_log_domain_matches_reference(n, gpu):
    logits = make_logits(3, n, n, dtype=torch.float64, scale=30.0, seed=n)
    check_against_reference(logits, 20, 0.5, torch.float32, gpu)


@pytest.mark.cuda
def test_gpu_grouped_paper_models(gpu):
    """The stacks of the WSCNN (25, 4 × 100) and WS-ResNet (49, 4 × 196) in one grouped call each."""
    for sizes in ([25, 100, 100, 100, 100], [49, 196, 196, 196, 196], [25, 392]):
        stacks = [make_logits(3, n, n, scale=2.0, seed=i).to(gpu) for i, n in enumerate(sizes)]
        stacks = [stack.requires_grad_() for stack in stacks]
        outputs = ts.triton_grouped_sinkhorn(stacks, 20, 1.0)
        grads = torch.autograd.grad(sum((o * o.log()).sum() for o in outputs), stacks)
        for stack, out, grad in zip(stacks, outputs, grads, strict=True):
            x = stack.detach().double().requires_grad_()
            expected = sinkhorn_reference(x, 20, 1.0)
            (expected_grad,) = torch.autograd.grad((expected * expected.log()).sum(), x)
            torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [25, 196, 392], ids=["packed", "chunked", "stepped"])
def test_gpu_poisoned_outputs_fully_written(n, gpu, monkeypatch):
    poisoned_outputs_check(n, {}, gpu, monkeypatch)


@pytest.mark.cuda
def test_gpu_compiled_training_step_matches_eager(gpu):
    """torch.compile(fullgraph=True, mode="reduce-overhead") of a WSCNN step with the grouped Sinkhorn."""
    import torch.nn.functional as F

    from symkernels.models import WSCNN
    from symkernels.nn import precompute_representations

    torch.manual_seed(0)
    model = WSCNN(hidden_channels=8, kernel_size=5, num_layers=2).to(gpu)
    x, y = torch.randn(16, 1, 28, 28, device=gpu), torch.randint(0, 10, (16,), device=gpu)
    params = list(model.parameters())

    def step(x, y):
        # On CUDA tensors the automatic choice is the triton backend for every op.
        with precompute_representations(model):
            return F.cross_entropy(model(x), y) + 0.1 * model.regularizers()[0]

    eager_loss = step(x, y)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, recording, replays
        loss = compiled(x, y)
        grads = [g.clone() for g in torch.autograd.grad(loss, params)]
        loss = loss.detach().clone()
    torch.testing.assert_close(loss, eager_loss.detach(), rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
