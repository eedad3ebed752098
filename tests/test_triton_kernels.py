"""The Triton launchers of the op contract (``symkernels.ops.sinkhorn_triton``,
``symkernels.ops.expansion_triton``) against the independent references: P, gradients and per-matrix
iterations for every kernel layout (packed, chunked, stepped), ragged sizes (n = 1, empty stacks), both
domains, the per-matrix early exit (tolerance and caps), NaN-poisoned outputs; the expansion and its
gradients; and (slow) the kernels compiled for sm_90.

Runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported, see conftest.py; CPU
tensors, tiny shapes) or on a GPU.
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

from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, implementation_for, make_logits

pytest.importorskip("triton")

from symkernels.ops import expansion_triton, sinkhorn_triton  # noqa: E402
from symkernels.ops.expansion_triton import backward_plan  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run here: CPU tensors under the interpreter, else the GPU (or a skip)."""
    return implementation_for("triton").device


# Tuning overrides that send small matrices through each kernel layout (BN = 8 for n = 5..8: the chunked
# kernel walks chunks of 4 rows, the stepped one 2 programs of 4 rows per matrix, in tiles of 4 rows; with a
# tolerance the tiles have 2 rows).
LAYOUTS = {
    "packed": {},
    "chunked": {"packed_max_n": 1, "chunk_elements": 32},
    "stepped": {"packed_max_n": 1, "fused_max_n": 1, "stepped_elements": 32, "stepped_slab_rows": 4},
}


def make_stacks(sizes, counts, *, scale=1.0, seed=0) -> list[torch.Tensor]:
    """float64 stacks ``[counts[l], n, n]`` of Gaussian logits."""
    return [
        make_logits(c, n, n, dtype=torch.float64, scale=scale, seed=seed + i)
        for i, (n, c) in enumerate(zip(sizes, counts, strict=True))
    ]


def concatenated(stacks, dtype=torch.float32) -> torch.Tensor:
    parts = [s.reshape(-1) for s in stacks]
    return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)


def pieces(flat: torch.Tensor, stacks):
    out, offset = [], 0
    for stack in stacks:
        out.append(flat[offset : offset + stack.numel()].view(stack.shape))
        offset += stack.numel()
    return out


def poison(monkeypatch, module) -> None:
    """Fresh allocations of ``module`` come filled with NaN (or -7 for integers)."""

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            return out.fill_(math.nan) if out.dtype.is_floating_point else out.fill_(-7)

        return make

    monkeypatch.setattr(module.torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(module.torch, "empty_like", poisoned(torch.empty_like))


def reference(stack64, n_iter, tau, tol, grad, caps=None):
    """P, the logits' gradient for ``grad`` and the iterations of the reference, per matrix (a cap is the
    reference's n_iter for that matrix); in float64 and in float32 (the same-dtype reference)."""
    results = {}
    for dtype in (torch.float64, torch.float32):
        x = stack64.to(dtype).requires_grad_()
        if caps is None:
            p, iterations = sinkhorn_reference(x, n_iter, tau, tol=tol, return_iterations=True)
        else:
            runs = [
                sinkhorn_reference(x[i], cap, tau, tol=tol, return_iterations=True)
                for i, cap in enumerate(caps)
            ]
            p = torch.stack([r[0] for r in runs])
            iterations = torch.stack([r[1] for r in runs])
        (g,) = torch.autograd.grad(p, x, grad.to(dtype))
        results[dtype] = (p.detach(), g, iterations)
    return results


def row_deviations(stack64: torch.Tensor, n_iter: int, tau: float) -> torch.Tensor:
    """``[n_iter, G]``: max_i |rowsum_i(P_t) - 1| of every iterate of every matrix (float64 reference)."""
    return torch.stack(
        [(sinkhorn_reference(stack64, t, tau).sum(-1) - 1).abs().amax(-1) for t in range(1, n_iter + 1)]
    )


def run_and_check(stacks, n_iter, tau, tol, device, monkeypatch, *, layout="packed", caps=None):
    """Forward and backward through the launchers, every allocation poisoned (all outputs must be written),
    compared with the reference stack by stack; returns ``domain`` and ``iterations``."""
    sizes = [s.shape[-1] for s in stacks]
    counts = [s.shape[0] for s in stacks]
    flat = concatenated(stacks)
    grad = make_logits(flat.numel(), seed=50)
    caps_tensor = None if caps is None else torch.tensor(caps, dtype=torch.int32, device=device)
    with sinkhorn_triton.tuning(**LAYOUTS[layout]):
        poison(monkeypatch, sinkhorn_triton)
        p, cols, domain, iterations = sinkhorn_triton.forward(
            flat.to(device), sizes, counts, n_iter, tau, tol, caps_tensor
        )
        grad_logits = sinkhorn_triton.backward(
            grad.to(device), flat.to(device), sizes, counts, cols, domain, iterations, tau
        )
        monkeypatch.undo()
    num_matrices = sum(counts)
    assert p.shape == flat.shape and p.dtype == flat.dtype and grad_logits.shape == flat.shape
    assert cols.shape == (num_matrices, n_iter, max(sizes, default=0)) and cols.dtype == torch.float64
    assert domain.shape == iterations.shape == (num_matrices,)
    assert domain.dtype == iterations.dtype == torch.int32
    p, cols, domain, iterations, grad_logits = (t.cpu() for t in (p, cols, domain, iterations, grad_logits))
    if tol > 0:
        # No iterate is within 5% of the tolerance: every backend and dtype stops at the same iteration.
        for stack in stacks:
            ratios = row_deviations(stack, n_iter, tau) / tol
            assert not bool(((ratios > 0.95) & (ratios < 1.05)).any()), ratios
    expected_iterations, first = [], 0
    for stack, got, got_grad, g in zip(
        stacks, pieces(p, stacks), pieces(grad_logits, stacks), pieces(grad, stacks), strict=True
    ):
        if stack.shape[0] == 0:
            continue
        stack_caps = None if caps is None else caps[first : first + stack.shape[0]]
        ref = reference(stack, n_iter, tau, tol, g, stack_caps)
        assert_as_accurate_as_reference(got, ref[torch.float32][0], ref[torch.float64][0])
        assert_as_accurate_as_reference(got_grad, ref[torch.float32][1], ref[torch.float64][1])
        assert torch.equal(ref[torch.float32][2], ref[torch.float64][2])
        expected_iterations += ref[torch.float64][2].tolist()
        first += stack.shape[0]
    assert iterations.tolist() == expected_iterations
    assert set(domain.tolist()) <= {0, 1}
    # The saved scalings: finite, nonzero exactly for the iterations run and the matrix's own columns.
    sizes_per_matrix = [n for n, c in zip(sizes, counts, strict=True) for _ in range(c)]
    for m, (n, t) in enumerate(zip(sizes_per_matrix, expected_iterations, strict=True)):
        assert bool(torch.isfinite(cols[m]).all())
        assert not bool(cols[m, t:].any()) and not bool(cols[m, :, n:].any())
        if domain[m] == 0:
            assert bool((cols[m, :t, :n] > 0).all())
    return domain, iterations


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn: fixed iterations.


@pytest.mark.smoke
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ragged_sizes_match_reference(layout, device, monkeypatch):
    """Stacks of n = 1, 5 and 3 in one call, every layout; an empty stack of n = 12 makes the saved
    scalings' rows wider than the kernels' blocks."""
    stacks = make_stacks([1, 12, 5, 3], [2, 0, 1, 2])
    domain, _ = run_and_check(stacks, 3, 0.7, 0.0, device, monkeypatch, layout=layout)
    if layout == "stepped":  # n = 1 stays with the fused kernels (fused_max_n = 1)
        assert domain.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("layout", ["packed", "chunked"])
def test_each_matrix_chooses_its_domain(layout, device, monkeypatch):
    """A spread beyond MAX_SPREAD (one matrix), or just beyond it in one row, sends only that matrix to the
    log domain, within one program."""
    (stack,) = make_stacks([6], [3], seed=5)
    stack[1] *= 2 * sinkhorn_triton.MAX_SPREAD
    stack[2, 0, 0] = stack[2, 0].min() + sinkhorn_triton.MAX_SPREAD + 1
    domain, _ = run_and_check([stack], 3, 1.0, 0.0, device, monkeypatch, layout=layout)
    assert domain.tolist() == [0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype, device):
    (stack,) = make_stacks([5], [3], seed=3)
    x = concatenated([stack], dtype)
    p, cols, domain, iterations = sinkhorn_triton.forward(x.to(device), [5], [3], 4, 1.0, 0.0, None)
    assert p.dtype == dtype and iterations.tolist() == [4, 4, 4]
    x64 = x.double().view(3, 5, 5)
    expected = sinkhorn_reference(x.float().view(3, 5, 5), 4).to(dtype)
    assert_as_accurate_as_reference(p.cpu().view(3, 5, 5), expected, sinkhorn_reference(x64, 4))
    grad = make_logits(75, seed=4).to(dtype)
    grad_logits = sinkhorn_triton.backward(
        grad.to(device), x.to(device), [5], [3], cols, domain, iterations, 1.0
    )
    assert grad_logits.dtype == dtype and bool(torch.isfinite(grad_logits).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the NaN matrix
def test_non_finite_logits_make_only_their_matrix_nan(device):
    (stack,) = make_stacks([4], [2], seed=10)
    stack[0, 1, 2] = float("nan")
    x = concatenated([stack]).to(device)
    p, _, domain, iterations = sinkhorn_triton.forward(x, [4], [2], 3, 1.0, 1e-3, None)
    p = p.cpu().view(2, 4, 4)
    assert bool(torch.isnan(p[0]).all()) and domain[0].item() == 1 and iterations[0].item() == 3
    expected = sinkhorn_reference(stack[1].float(), 3, tol=1e-3)
    torch.testing.assert_close(p[1], expected, rtol=1e-5, atol=1e-6)


def test_no_matrices(device):
    for sizes, counts in (([3, 2], [0, 0]), ([], [])):
        x = torch.zeros(0, device=device)
        p, cols, domain, iterations = sinkhorn_triton.forward(x, sizes, counts, 4, 1.0, 1e-3, None)
        assert p.shape == (0,) and cols.shape == (0, 4, max(sizes, default=0))
        assert domain.shape == iterations.shape == (0,)
        grad = sinkhorn_triton.backward(p, x, sizes, counts, cols, domain, iterations, 1.0)
        assert grad.shape == (0,)


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn: the per-matrix early exit.

# sizes, counts, n_iter, tau, tol, scale, seed (n = 5, 6: two chunks or programs in the larger layouts).
# Iterations run: [5, 5, 7, 4, 1] and [4, 3, 8].
EARLY_EXIT_CASES = {
    "scaling": ([6, 5, 1], [2, 2, 1], 8, 0.7, 1e-2, 1.0, 0),
    "log": ([5], [3], 8, 1.0, 0.2, 50.0, 1),
}


# The stepped kernels always iterate in the log domain: one case covers them.
@pytest.mark.smoke
@pytest.mark.parametrize(
    "layout,case",
    [
        ("packed", "scaling"),
        ("packed", "log"),
        ("chunked", "scaling"),
        ("chunked", "log"),
        ("stepped", "log"),
    ],
)
def test_early_exit_matches_reference(layout, case, device, monkeypatch):
    """Each matrix stops at its own iteration (several per program), as the reference's per-matrix loop; the
    gradient is that of the iterations run."""
    sizes, counts, n_iter, tau, tol, scale, seed = EARLY_EXIT_CASES[case]
    stacks = make_stacks(sizes, counts, scale=scale, seed=seed)
    domain, iterations = run_and_check(stacks, n_iter, tau, tol, device, monkeypatch, layout=layout)
    assert len(set(iterations.tolist())) > 1 and min(iterations.tolist()) < n_iter
    if case == "log":
        assert set(domain.tolist()) == {1}


@pytest.mark.parametrize(
    "layout,tol", [("packed", 0.0), ("packed", 1e-2), ("chunked", 0.0), ("stepped", 1e-2)]
)
def test_caps_limit_each_matrix(layout, tol, device, monkeypatch):
    """caps[m] bounds matrix m's iterations (with and without a tolerance); cap 1 runs one iteration."""
    caps = [1, 5, 3, 8, 2]  # the tolerance alone stops them after [5, 6, 3, 7, 4] iterations
    stacks = make_stacks([6, 5], [3, 2])
    _, iterations = run_and_check(stacks, 8, 0.7, tol, device, monkeypatch, layout=layout, caps=caps)
    assert all(t <= cap for t, cap in zip(iterations.tolist(), caps, strict=True))
    if tol == 0.0:
        assert iterations.tolist() == caps


# ------------------------------------------------------------------------------------------------------------
# Kernel expansion.


def expansion_inputs(groups, in_groups, k, out_channels, in_channels, seed=0):
    d = in_groups * k * k
    reps = sinkhorn_reference(make_logits(groups, d, d, dtype=torch.float64, scale=2.0, seed=seed))
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=seed + 1)
    return reps, weight


def with_identity(reps: torch.Tensor, leading_identity: bool) -> torch.Tensor:
    if not leading_identity:
        return reps
    identity = torch.eye(reps.shape[-1], dtype=reps.dtype, device=reps.device).unsqueeze(0)
    return torch.cat([identity, reps])


def check_expansion(reps64, weight64, k, leading_identity, dtype, device, grad_layout=lambda g: g):
    """The kernel and both gradients at least as accurate (vs float64) as the same-dtype reference."""
    exact = [t.clone().requires_grad_() for t in (reps64, weight64)]
    truth = expand_kernel_reference(with_identity(exact[0], leading_identity), exact[1], k)
    # The gradient as it arrives (its values too: an expanded one repeats its first entry).
    grad64 = grad_layout(make_logits(*truth.shape, dtype=torch.float64, seed=11))
    truth_grads = torch.autograd.grad(truth, exact, grad64)
    low = [t.to(dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(with_identity(low[0], leading_identity), low[1], k)
    expected_grads = torch.autograd.grad(expected, low, grad64.to(dtype))

    reps, weight = (t.detach().to(device) for t in low)
    kernel = expansion_triton.forward(reps, weight, k, leading_identity)
    assert kernel.shape == truth.shape and kernel.dtype == dtype and kernel.is_contiguous()
    assert_as_accurate_as_reference(kernel.cpu(), expected.detach(), truth.detach())
    grad = grad_layout(grad64.to(dtype).contiguous().to(device))
    grads = expansion_triton.backward(grad, reps, weight, k, leading_identity)
    for got, want, true, tensor in zip(grads, expected_grads, truth_grads, low, strict=True):
        assert got.shape == tensor.shape and got.dtype == dtype and got.is_contiguous()
        assert_as_accurate_as_reference(got.cpu(), want, true)


@pytest.mark.smoke
@pytest.mark.parametrize(
    "shape,leading_identity,dtype",
    [
        ((4, 1, 3, 2, 3), False, torch.float32),
        ((3, 2, 3, 3, 2), True, torch.float32),
        ((1, 1, 1, 1, 1), False, torch.float32),
        ((4, 1, 5, 3, 2), True, torch.float16),
    ],
    ids=["G4-k3", "identity-Gin2", "all-ones", "fp16-k5"],
)
def test_expansion_matches_reference(shape, leading_identity, dtype, device):
    reps, weight = expansion_inputs(*shape, seed=sum(shape))
    check_expansion(reps[1:] if leading_identity else reps, weight, shape[2], leading_identity, dtype, device)


def test_expansion_reads_gradients_through_their_strides(device):
    """channels_last and expanded (stride-0, the gradient of a sum) kernel gradients; a reduction long enough
    to be split into partials."""
    reps, weight = expansion_inputs(3, 1, 2, 16, 8, seed=3)
    assert backward_plan(16, 8, 3, 2, 4, exact=True).splits > 1
    check_expansion(
        reps, weight, 2, False, torch.float32, device, lambda g: g.to(memory_format=torch.channels_last)
    )
    check_expansion(
        reps[1:], weight, 2, True, torch.float32, device, lambda g: g[:1, :1, :1, :1].expand(g.shape)
    )


def test_expansion_of_only_the_identity(device):
    weight = make_logits(3, 2, 9, seed=1).to(device)
    reps = torch.empty(0, 9, 9, device=device)
    kernel = expansion_triton.forward(reps, weight, 3, True)
    torch.testing.assert_close(kernel, weight.reshape(3, 2, 3, 3), rtol=0, atol=0)
    grad = make_logits(3, 2, 3, 3, seed=2).to(device)
    grad_reps, grad_weight = expansion_triton.backward(grad, reps, weight, 3, True)
    assert grad_reps.shape == (0, 9, 9)
    torch.testing.assert_close(grad_weight, grad.reshape(3, 2, 9), rtol=0, atol=0)


@pytest.mark.parametrize("leading_identity", [False, True])
def test_expansion_outputs_fully_written(leading_identity, device, monkeypatch):
    reps, weight = expansion_inputs(3, 1, 3, 17, 5, seed=9)
    reps = (reps[1:] if leading_identity else reps).float().to(device)
    weight = weight.float().to(device)
    grad = make_logits(17 * 3, 5, 3, 3, seed=4).to(device)
    poison(monkeypatch, expansion_triton)
    kernel = expansion_triton.forward(reps, weight, 3, leading_identity)
    grad_reps, grad_weight = expansion_triton.backward(grad, reps, weight, 3, leading_identity)
    monkeypatch.undo()
    for tensor in (kernel, grad_reps, grad_weight):
        assert bool(torch.isfinite(tensor).all())
    stack = with_identity(reps, leading_identity)
    torch.testing.assert_close(kernel, expand_kernel_reference(stack, weight, 3), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Compiled for the GPU (no GPU needed).

AOT_COMPILE = textwrap.dedent(
    """
    import os, re, subprocess, sys, tempfile
    from concurrent.futures import ProcessPoolExecutor
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from symkernels.ops import expansion_triton as ET, sinkhorn_triton as st
    from symkernels.triton_kernels import expansion as E, sinkhorn_chunked as C, sinkhorn_packed as F
    from symkernels.triton_kernels import sinkhorn_chunked_backward as CB, sinkhorn_stepped as S

    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    KERNELS = {"F": F, "C": C, "CB": CB, "S": S, "E": E}
    scalars = dict(tau="fp32", tol="fp32", max_spread="fp32", scale_lo="fp32", scale_hi="fp32")
    vectors = dict(cols_ptr="*fp64", domain_ptr="*i32", iterations_ptr="*i32", caps_ptr="*i32",
                   meta_ptr="*i64", programs_ptr="*i64", status_ptr="*i32", k_ptr="*fp32", bars_ptr="*fp32",
                   partials_ptr="*fp32", maxima_ptr="*fp64", sums_ptr="*fp32", target_ptr="*fp32")

    def compile(job):
        module, name, dtype, constexprs, warps = job
        fn = getattr(KERNELS[module], name)
        data = ("x_ptr", "p_ptr", "grad_ptr", "out_ptr", "reps_ptr", "weight_ptr", "grad_weight_ptr")
        types = dict(scalars, **vectors, **{pointer: "*" + dtype for pointer in data})
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr
        os.unlink(f.name)
        spills = sum(int(s) for s in re.findall(r"(\\d+) bytes spill stores", report))
        return f"{name} {dtype} {constexprs} warps {warps}: spill stores {spills}"

    def split(plan):
        return {k: v for k, v in plan.items() if k != "num_warps"}, plan["num_warps"]

    plain, both = dict(TEST=False, CAPPED=False), dict(TEST=True, CAPPED=True)
    jobs = []
    for n, dtype in ((4, "fp32"), (16, "fp32"), (64, "bf16")):  # MB = 256, 16, 1 (128, 8, 1 stopping)
        jobs.append(("F", "packed_forward_kernel", dtype, {**split(st.packed_plan(n, 1 << 20))[0], **plain},
                     split(st.packed_plan(n, 1 << 20))[1]))
        stop = st.packed_plan(n, 1 << 20, stopping=True)
        jobs.append(("F", "packed_forward_kernel", dtype, {**split(stop)[0], **both}, split(stop)[1]))
        jobs.append(("F", "packed_backward_kernel", dtype, *split(st.packed_plan(n, 1 << 20, backward=True))))
    n = st.current_tuning().fused_max_n
    for flags in (plain, both):
        plan = st.chunked_plan(n, backward=False, test=flags["TEST"])
        jobs.append(("C", "chunked_forward_kernel", "fp32", {**split(plan)[0], **flags}, split(plan)[1]))
    jobs.append(("CB", "chunked_backward_kernel", "fp32", *split(st.chunked_plan(n, backward=True))))
    c, w = split(st.stepped_plan(784))
    jobs.append(("S", "stepped_forward_kernel", "fp32", {**c, **both}, w))
    jobs.append(("S", "stepped_backward_step_kernel", "fp32", c, w))
    jobs.append(("S", "stepped_backward_final_kernel", "fp32", c, w))
    for dtype, exact, identity in (("fp32", True, 1), ("bf16", False, 0)):  # the largest blocks (d >= 64)
        flags = dict(LEADING_IDENTITY=identity, DOT_F32=exact)
        forward = dict(flags, BLOCK_R=64, BLOCK_N=64, BLOCK_M=32)
        jobs.append(("E", "expand_forward_kernel", dtype, forward, 4))
        plan = ET.backward_plan(64, 64, 4, 4 - identity, 196, exact=exact)
        blocks = dict(BLOCK_R=plan.block_r, BLOCK_N=plan.block_n, BLOCK_M=plan.block_m)
        jobs.append(("E", "expand_backward_kernel", dtype, dict(flags, **blocks), 8))
    jobs.append(("E", "sum_partials_kernel", "bf16", dict(BLOCK=1024), 4))
    with ProcessPoolExecutor(2) as pool:
        for line in pool.map(compile, jobs):
            print(line, flush=True)
    print("compiled", len(jobs))
    """
)

# The tuning is spill-free with triton 3.8's code generation; older versions allocate registers differently
# (triton 3.6 spills in some kernels), where every kernel must still compile.
SPILL_FREE_FROM_TRITON = (3, 8)


@pytest.mark.smoke
@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The interpreter accepts code the GPU compiler rejects: compile the kernels at their default tuning for
    sm_90 without a GPU (packed at three block sizes, with and without the early exit, fp32 and bf16; chunked;
    stepped; expansion), and check that ptxas allocates them without spilling registers."""
    import triton
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    reports = re.findall(r"^(.*): spill stores (\d+)$", result.stdout, flags=re.MULTILINE)
    assert len(reports) == int(result.stdout.split("compiled")[-1]), result.stdout
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version >= SPILL_FREE_FROM_TRITON:
        assert all(int(spills) == 0 for _, spills in reports), result.stdout
