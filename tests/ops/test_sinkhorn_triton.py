"""The Triton Sinkhorn launchers (``symkernels.ops.sinkhorn_triton``) against the reference: P, gradients and
per-matrix iterations for every kernel layout (packed, chunked, stepped), ragged sizes (n = 1, empty stacks),
both domains, low-precision inputs, non-finite logits, the per-matrix early exit (tolerance and caps), and
outputs fully written (every allocation NaN-poisoned).

Runs under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported, see conftest.py; CPU
tensors, tiny shapes) or on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels.reference import sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits
from tests.triton_testing import only_programs, poison

pytest.importorskip("triton")

from symkernels.ops import sinkhorn_triton  # noqa: E402

pytestmark = pytest.mark.triton


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
    max_n = max((n for n, count in zip(sizes, counts, strict=True) if count), default=0)
    assert cols.shape == (num_matrices, n_iter, max_n) and cols.dtype == torch.float64
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
def test_ragged_sizes_match_reference(layout, triton_device, monkeypatch):
    """Stacks of n = 1, 5 and 3 in one call, every layout, next to an empty stack of n = 12 (which does not
    widen the saved scalings' rows)."""
    stacks = make_stacks([1, 12, 5, 3], [2, 0, 1, 2])
    domain, _ = run_and_check(stacks, 3, 0.7, 0.0, triton_device, monkeypatch, layout=layout)
    if layout == "stepped":  # n = 1 stays with the fused kernels (fused_max_n = 1)
        assert domain.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("layout", ["packed", "chunked"])
def test_each_matrix_chooses_its_domain(layout, triton_device, monkeypatch):
    """A spread beyond MAX_SPREAD (one matrix), or just beyond it in one row, sends only that matrix to the
    log domain, within one program."""
    (stack,) = make_stacks([6], [3], seed=5)
    stack[1] *= 2 * sinkhorn_triton.MAX_SPREAD
    stack[2, 0, 0] = stack[2, 0].min() + sinkhorn_triton.MAX_SPREAD + 1
    domain, _ = run_and_check([stack], 3, 1.0, 0.0, triton_device, monkeypatch, layout=layout)
    assert domain.tolist() == [0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype, triton_device):
    (stack,) = make_stacks([5], [3], seed=3)
    x = concatenated([stack], dtype)
    p, cols, domain, iterations = sinkhorn_triton.forward(x.to(triton_device), [5], [3], 4, 1.0, 0.0, None)
    assert p.dtype == dtype and iterations.tolist() == [4, 4, 4]
    x64 = x.double().view(3, 5, 5)
    expected = sinkhorn_reference(x.float().view(3, 5, 5), 4).to(dtype)
    assert_as_accurate_as_reference(p.cpu().view(3, 5, 5), expected, sinkhorn_reference(x64, 4))
    grad = make_logits(75, seed=4).to(dtype)
    grad_logits = sinkhorn_triton.backward(
        grad.to(triton_device), x.to(triton_device), [5], [3], cols, domain, iterations, 1.0
    )
    assert grad_logits.dtype == dtype and bool(torch.isfinite(grad_logits).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the NaN matrix
def test_non_finite_logits_make_only_their_matrix_nan(triton_device):
    (stack,) = make_stacks([4], [2], seed=10)
    stack[0, 1, 2] = float("nan")
    x = concatenated([stack]).to(triton_device)
    p, _, domain, iterations = sinkhorn_triton.forward(x, [4], [2], 3, 1.0, 1e-3, None)
    p = p.cpu().view(2, 4, 4)
    assert bool(torch.isnan(p[0]).all()) and domain[0].item() == 1 and iterations[0].item() == 3
    expected = sinkhorn_reference(stack[1].float(), 3, tol=1e-3)
    torch.testing.assert_close(p[1], expected, rtol=1e-5, atol=1e-6)


def test_no_matrices(triton_device):
    """Every stack empty: ``cols`` is ``[0, n_iter, 0]``, as the op's fake (and every other device) says; an
    empty stack's size does not widen it."""
    for sizes, counts in (([3, 2], [0, 0]), ([1], [0]), ([], [])):
        x = torch.zeros(0, device=triton_device)
        p, cols, domain, iterations = sinkhorn_triton.forward(x, sizes, counts, 4, 1.0, 1e-3, None)
        assert p.shape == (0,) and cols.shape == (0, 4, 0)
        assert domain.shape == iterations.shape == (0,)
        grad = sinkhorn_triton.backward(p, x, sizes, counts, cols, domain, iterations, 1.0)
        assert grad.shape == (0,)


def test_empty_stacks_give_the_shapes_of_the_fake(triton_device):
    """Through the op: every stack empty, or empty stacks next to smaller matrices, give the outputs' shapes
    that the fake implementation (torch.compile's view of the op) gives."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [[(0, 5, 5)], [(0, 5, 5), (0, 2, 2)], [(0, 12, 12), (2, 3, 3)]]
    for shapes in cases:
        stacks = [torch.rand(shape, device=triton_device) for shape in shapes]
        got = torch.ops.symkernels.sinkhorn(stacks, 4, 1.0, 0.0, "matrix", None, "triton")
        with FakeTensorMode() as mode:
            fake = torch.ops.symkernels.sinkhorn(
                [mode.from_tensor(s) for s in stacks], 4, 1.0, 0.0, "matrix", None, "triton"
            )
        assert [t.shape for t in got[0]] == [t.shape for t in fake[0]]
        assert [t.shape for t in got[1:]] == [t.shape for t in fake[1:]], shapes


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_out_of_range_caps_are_clamped(layout, triton_device):
    """Caps outside 1..n_iter are clamped, as the CUDA kernels clamp them (the launchers cannot check caps
    without a host sync): 0 and below run one iteration, past n_iter run n_iter."""
    stacks = make_stacks([6, 5], [3, 2])
    flat = concatenated(stacks).to(triton_device)
    runs = {}
    for name, caps in (("raw", [0, 99, -5, 3, 7]), ("clamped", [1, 7, 1, 3, 7])):
        with sinkhorn_triton.tuning(**LAYOUTS[layout]):
            caps_tensor = torch.tensor(caps, dtype=torch.int32, device=triton_device)
            outputs = sinkhorn_triton.forward(flat, [6, 5], [3, 2], 7, 0.7, 0.0, caps_tensor)
        runs[name] = [t.cpu() for t in outputs]
    assert runs["raw"][3].tolist() == [1, 7, 1, 3, 7]
    for got, want in zip(runs["raw"], runs["clamped"], strict=True):
        assert torch.equal(got, want)


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
def test_early_exit_matches_reference(layout, case, triton_device, monkeypatch):
    """Each matrix stops at its own iteration (several per program), as the reference's per-matrix loop; the
    gradient is that of the iterations run."""
    sizes, counts, n_iter, tau, tol, scale, seed = EARLY_EXIT_CASES[case]
    stacks = make_stacks(sizes, counts, scale=scale, seed=seed)
    domain, iterations = run_and_check(stacks, n_iter, tau, tol, triton_device, monkeypatch, layout=layout)
    assert len(set(iterations.tolist())) > 1 and min(iterations.tolist()) < n_iter
    if case == "log":
        assert set(domain.tolist()) == {1}


@pytest.mark.parametrize(
    "layout,tol", [("packed", 0.0), ("packed", 1e-2), ("chunked", 0.0), ("stepped", 1e-2)]
)
def test_caps_limit_each_matrix(layout, tol, triton_device, monkeypatch):
    """caps[m] bounds matrix m's iterations (with and without a tolerance); cap 1 runs one iteration."""
    caps = [1, 5, 3, 8, 2]  # the tolerance alone stops them after [5, 6, 3, 7, 4] iterations
    stacks = make_stacks([6, 5], [3, 2])
    _, iterations = run_and_check(stacks, 8, 0.7, tol, triton_device, monkeypatch, layout=layout, caps=caps)
    assert all(t <= cap for t, cap in zip(iterations.tolist(), caps, strict=True))
    if tol == 0.0:
        assert iterations.tolist() == caps


# ------------------------------------------------------------------------------------------------------------
# The hyper-connection workload: [262144, n, n] at T = 20 for n = 4 and 8, with the GPU's tuning (packed
# programs of 256 or 64 matrices, 1024 or 4096 of them).

HYPER_BATCH = 262_144


@pytest.mark.parametrize("n", [4, 8])
def test_hyper_connection_batches_on_a_few_programs(n, monkeypatch):
    """In the interpreter, which cannot run the whole grid in seconds: the programs that serve the first, a
    middle and the last matrices, forward and backward, with every other output left as allocated (NaN)."""
    from symkernels.ops.triton_support import INTERPRETED

    if not INTERPRETED:
        pytest.skip("the whole batch runs on the GPU (test_hyper_connection_batches_on_the_gpu)")
    with sinkhorn_triton.tuning(packed_elements=sinkhorn_triton.Tuning().packed_elements):
        forward_mb = sinkhorn_triton.packed_plan(n, HYPER_BATCH)["MB"]
        backward_mb = sinkhorn_triton.packed_plan(n, HYPER_BATCH, backward=True)["MB"]
        windows = [0, HYPER_BATCH // 2, HYPER_BATCH - forward_mb]  # first matrices of forward programs

        def served(name, program):
            first = program * (backward_mb if "backward" in name else forward_mb)
            return any(start <= first < start + forward_mb for start in windows)

        x = make_logits(HYPER_BATCH * n * n, seed=n, scale=2.0)
        grad = make_logits(HYPER_BATCH * n * n, seed=n + 1)
        poison(monkeypatch, sinkhorn_triton)
        with only_programs(served):
            p, cols, domain, iterations = sinkhorn_triton.forward(x, [n], [HYPER_BATCH], 20, 1.0, 0.0, None)
            grad_x = sinkhorn_triton.backward(grad, x, [n], [HYPER_BATCH], cols, domain, iterations, 1.0)
    matrices = torch.cat([torch.arange(start, start + forward_mb) for start in windows])
    others = torch.ones(HYPER_BATCH, dtype=torch.bool)
    others[matrices] = False
    p, grad_x = p.view(HYPER_BATCH, n, n), grad_x.view(HYPER_BATCH, n, n)
    assert bool(p[others].isnan().all()) and bool(grad_x[others].isnan().all())
    assert bool((iterations[matrices] == 20).all()) and bool((domain[matrices] == 0).all())
    x64 = x.view(HYPER_BATCH, n, n)[matrices].double()
    ref = reference(x64, 20, 1.0, 0.0, grad.view(HYPER_BATCH, n, n)[matrices].double())
    assert_as_accurate_as_reference(p[matrices], ref[torch.float32][0], ref[torch.float64][0])
    assert_as_accurate_as_reference(grad_x[matrices], ref[torch.float32][1], ref[torch.float64][1])


@pytest.mark.parametrize("n", [4, 8])
def test_hyper_connection_batches_on_the_gpu(n, gpu):
    """Every matrix, up to the last, forward and backward, against the native CPU kernels (float64)."""
    x = make_logits(HYPER_BATCH * n * n, seed=n, scale=2.0)
    grad = make_logits(HYPER_BATCH * n * n, seed=n + 1)
    p, cols, domain, iterations = sinkhorn_triton.forward(x.to(gpu), [n], [HYPER_BATCH], 20, 1.0, 0.0, None)
    grad_x = sinkhorn_triton.backward(
        grad.to(gpu), x.to(gpu), [n], [HYPER_BATCH], cols, domain, iterations, 1.0
    )
    x64 = x.view(HYPER_BATCH, n, n).double().requires_grad_()
    want = symkernels.sinkhorn(x64, 20, backend="cpu")
    (want_grad,) = torch.autograd.grad(want, x64, grad.view(HYPER_BATCH, n, n).double())
    assert bool((iterations == 20).all())
    torch.testing.assert_close(p.cpu().view(HYPER_BATCH, n, n).double(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_x.cpu().view(HYPER_BATCH, n, n).double(), want_grad, rtol=1e-3, atol=1e-5)
