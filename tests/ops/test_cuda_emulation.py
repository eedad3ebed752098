"""The CUDA Sinkhorn and kernel-expansion kernels' logic, run on the CPU.

tests/ops/cuda_emulation compiles the kernel templates of csrc/sinkhorn/sinkhorn_cuda_*.cuh as host code, each
CUDA thread a fiber (cuda_emulation.h), with the launches the CUDA entry points make; the cluster size and the
rows of K kept in shared memory are chosen here, to reach every storage path (registers, shared memory, the
global copy) and the exchange between the CTAs of a cluster. The kernels must match the reference (P,
iterations, gradient) on the GPU parity sizes, write every output element (fresh outputs are NaN), and agree
with the native CPU kernels on the saved state. The expansion kernels (csrc/expansion/expansion_cuda.cuh) must
match the reference on the parity shapes of test_expansion.py, in every dtype, with their tiles cut at every
edge and their grad_reps reduction split into runs. What this cannot find: data races, and anything about
speed (the GPU tests in test_cuda_kernels.py and compute-sanitizer in scripts/gpu_check.sh do that).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from symkernels import _native
from symkernels.functional import prepend_identity
from symkernels.reference import expand_kernel_reference, sinkhorn_reference
from tests.testing import assert_as_accurate_as_reference, make_logits

ROOT = Path(__file__).resolve().parents[2]
EMULATION = ROOT / "tests" / "ops" / "cuda_emulation"
CSRC = ROOT / "csrc"


def _sources_key() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    files = sorted(EMULATION.glob("*")) + sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def emulated():
    """The emulated kernels' module, compiled once per source version into a cache folder (~1 min)."""
    from torch.utils.cpp_extension import load

    key = _sources_key()
    cache = Path(os.environ.get("SYMKERNELS_CACHE", Path.home() / ".cache" / "symkernels"))
    build = cache / f"cuda-emulation-{key}"
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"symkernels_cuda_emulation_{key}",
        sources=[
            str(EMULATION / "binding.cpp"),
            str(EMULATION / "sinkhorn_emulated.cpp"),
            str(EMULATION / "expansion_emulated.cpp"),
        ],
        extra_include_paths=[str(CSRC), str(EMULATION)],
        # Unoptimised: the harness tells collectives apart by their call site, and an optimiser that
        # duplicates code paths (tail duplication, loop unswitching) gives one collective several sites.
        extra_cflags=["-O0"],
        build_directory=str(build),
        verbose=False,
    )


# Block launches: (CTAs per cluster, rows of K per CTA in shared memory). (1, 0): rows past the registers in
# the global copy; (1, 4096): in shared memory; clusters split the rows (and need the exchange between CTAs).
LAUNCHES = {"cta": (1, 4096), "global-rows": (1, 0), "cluster2": (2, 4096), "cluster4-mixed": (4, 3)}


def run(
    emulated, logits, sizes, counts, n_iter, tau, tol=0.0, caps=None, launch=(1, 4096), grad=None, blocks=()
):
    """Forward (and backward with ``grad``) of the emulated kernels; ``blocks``: only those blocks of each
    launch (default: all)."""
    p, cols, domain, iterations = emulated.sinkhorn_forward(
        logits, sizes, counts, n_iter, tau, tol, caps, *launch, blocks=list(blocks)
    )
    grad_logits = None
    if grad is not None:
        grad_logits = emulated.sinkhorn_backward(
            grad, logits, sizes, counts, cols, domain, iterations, tau, *launch, blocks=list(blocks)
        )
    return p, cols, domain, iterations, grad_logits


def check_stack(emulated, logits64, n_iter, tau, dtype, *, tol=0.0, launch=(1, 4096)):
    """One stack [B, n, n]: P, iterations and gradient as accurate as the same-dtype reference."""
    b, n, _ = logits64.shape
    logits64 = logits64.to(dtype).to(torch.float64).requires_grad_()
    truth, truth_iterations = sinkhorn_reference(logits64, n_iter, tau, tol=tol, return_iterations=True)
    grad = make_logits(b, n, n, dtype=torch.float64, seed=11).to(dtype)
    (truth_grad,) = torch.autograd.grad(truth, logits64, grad.to(torch.float64))
    low = logits64.detach().to(dtype).requires_grad_()
    expected = sinkhorn_reference(low, n_iter, tau, tol=tol)
    (expected_grad,) = torch.autograd.grad(expected, low, grad)

    flat = low.detach().reshape(-1).contiguous()
    p, cols, domain, iterations, got_grad = run(
        emulated, flat, [n], [b], n_iter, tau, tol, launch=launch, grad=grad.reshape(-1).contiguous()
    )
    assert not p.isnan().any() and not got_grad.isnan().any(), "an output element was not written"
    assert not cols.isnan().any() and bool(((domain == 0) | (domain == 1)).all())
    if tol:
        assert torch.equal(iterations, truth_iterations.to(torch.int32)), (iterations, truth_iterations)
    else:
        assert bool((iterations == n_iter).all()), iterations
    assert_as_accurate_as_reference(p.view(b, n, n), expected.detach(), truth.detach())
    assert_as_accurate_as_reference(got_grad.view(b, n, n), expected_grad, truth_grad)
    return cols, domain, iterations


# The GPU parity sizes (test_sinkhorn.py::GPU_SIZES), each kernel layout: small groups of 2..32 lanes, block
# widths CT = 2..32. Few iterations for the largest sizes: the fibers are slow, not the math.
PARITY = [(1, 20), (3, 20), (9, 20), (16, 20), (25, 20), (36, 20), (49, 8), (64, 8), (100, 3), (196, 2),
          (256, 2), (392, 1), (784, 1)]  # fmt: skip


@pytest.mark.parametrize(("n", "n_iter"), PARITY, ids=[f"n{n}-T{t}" for n, t in PARITY])
def test_emulated_kernels_match_reference_on_the_parity_sizes(emulated, n, n_iter):
    batch = max(1, min(3, 2048 // (n * n)))
    logits = make_logits(batch, n, n, dtype=torch.float64, seed=n)
    check_stack(emulated, logits, n_iter, 1.0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", [7, 40])
def test_emulated_kernels_read_and_write_half_types(emulated, n, dtype):
    check_stack(emulated, make_logits(2, n, n, dtype=torch.float64, seed=3), 5, 0.7, dtype)


STORAGE_CASES = [(40, name) for name in LAUNCHES] + [(100, "global-rows"), (100, "cluster4-mixed")]


@pytest.mark.parametrize(("n", "launch"), STORAGE_CASES, ids=[f"{n}-{name}" for n, name in STORAGE_CASES])
def test_emulated_block_kernels_on_every_storage_path(emulated, n, launch):
    launch = LAUNCHES[launch]
    logits = make_logits(2, n, n, dtype=torch.float64, seed=n + 1)
    check_stack(emulated, logits, 4, 0.8, torch.float32, launch=launch)


@pytest.mark.parametrize("launch", [LAUNCHES["cta"], LAUNCHES["cluster2"]], ids=["cta", "cluster2"])
@pytest.mark.parametrize("n", [6, 40])
def test_emulated_log_domain_and_tolerance_exit(emulated, n, launch):
    """A spread-out matrix next to ordinary ones goes to the log domain alone; the exit is per matrix."""
    logits = make_logits(3, n, n, dtype=torch.float64, seed=5)
    logits[1] *= 60.0  # spread beyond the scaling domain's limit
    logits[2] *= 0.02  # converges within a few iterations
    _, domain, iterations = check_stack(emulated, logits, 6, 1.0, torch.float32, launch=launch)
    assert domain.tolist() == [0, 1, 0]
    _, domain, iterations = check_stack(emulated, logits, 6, 1.0, torch.float32, tol=1e-4, launch=launch)
    assert domain.tolist() == [0, 1, 0] and iterations[2] < iterations[0], iterations


# Where CUDA's expf at its worst error (cuda_emulation.h) broke the bound in the small kernels' log domain
# (gradients at up to 2.2x of it): the kernels use precise_expf (csrc/cuda_device.cuh) instead.
# (n, logit scale, tol, n_iter, tau); a block-kernel case too.
GPU_EXP_CASES = [
    (5, 50.0, 0.0, 8, 1.0),
    (5, 50.0, 0.2, 8, 1.0),
    (5, 20.0, 0.0, 6, 0.5),
    (6, 20.0, 0.0, 6, 0.5),
    (40, 20.0, 0.0, 6, 0.5),
]


@pytest.mark.parametrize(
    ("n", "scale", "tol", "n_iter", "tau"),
    GPU_EXP_CASES,
    ids=[f"n{c[0]}-x{c[1]:g}-tol{c[2]:g}" for c in GPU_EXP_CASES],
)
def test_emulated_log_domain_meets_the_bound_with_the_gpus_expf(emulated, n, scale, tol, n_iter, tau):
    logits = make_logits(3, n, n, dtype=torch.float64, scale=scale, seed=n + int(scale))
    _, domain, _ = check_stack(emulated, logits, n_iter, tau, torch.float32, tol=tol)
    assert bool((domain == 1).any())


def _stacks(flat, sizes, counts):
    pieces = flat.split([c * n * n for n, c in zip(sizes, counts, strict=True)])
    return [piece.view(c, n, n) for piece, n, c in zip(pieces, sizes, counts, strict=True)]


def test_emulated_ragged_call_matches_the_native_cpu_kernels(emulated):
    """Stacks of every kernel family in one call, with caps: the same iterations, domains and (to float32
    rounding) the same saved column scalings and outputs as the native CPU kernels."""
    if not _native.native_status().loaded:
        pytest.fail(f"the native CPU kernels are unavailable: {_native.native_status().reason}")
    sizes, counts = [3, 40, 17, 3, 70], [2, 1, 3, 0, 1]
    flat = torch.cat([make_logits(c * n * n, seed=n) for n, c in zip(sizes, counts, strict=True)])
    caps = torch.tensor([5, 2, 6, 1, 3, 6, 4], dtype=torch.int32)
    grad = make_logits(flat.numel(), seed=2)
    got = run(emulated, flat, sizes, counts, 6, 0.9, 0.0, caps, launch=LAUNCHES["cluster2"], grad=grad)
    library = _native.library()
    stacks = _stacks(flat, sizes, counts)
    want_p, *want = library.sinkhorn_forward(stacks, 6, 0.9, 0.0, False, caps)
    want_grads = library.sinkhorn_backward(_stacks(grad, sizes, counts), stacks, *want, 0.9)
    want = [torch.cat([q.reshape(-1) for q in want_p]), *want]
    want_grad = torch.cat([g.reshape(-1) for g in want_grads])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert got[3].tolist() == caps.tolist()
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[4], want_grad, rtol=1e-4, atol=1e-5)


def test_emulated_kernels_clamp_out_of_range_caps(emulated):
    """The CUDA entry points cannot read caps without a host sync: the kernels clamp them to 1..n_iter."""
    flat = make_logits(3 * 16, seed=1)
    caps = torch.tensor([0, 99, -5], dtype=torch.int32)
    iterations = run(emulated, flat, [4], [3], 7, 1.0, 0.0, caps)[3]
    assert iterations.tolist() == [1, 7, 1]


# Kernel expansion: (G', G_in, k, C_out, C_in), test_expansion.py's shapes and paper shapes, plus tiles cut at
# every edge: more (o, i) rows than one tile (72, 130) and d past one tile (d = 100: 64 + 36 columns).
EXPANSION_SHAPES = [(1, 1, 1, 1, 1), (4, 1, 3, 2, 1), (4, 4, 1, 3, 2), (1, 4, 3, 1, 3), (4, 1, 5, 3, 2),
                    (2, 1, 7, 1, 1), (4, 4, 3, 2, 2), (3, 1, 5, 8, 1), (3, 4, 5, 6, 5), (2, 1, 3, 9, 8),
                    (1, 2, 3, 13, 10), (0, 1, 3, 2, 3)]  # fmt: skip


def expansion_inputs(learned, in_groups, k, out_channels, in_channels, seed=0):
    d = in_groups * k * k
    reps = sinkhorn_reference(make_logits(max(learned, 1), d, d, dtype=torch.float64, scale=2.0, seed=seed))
    weight = make_logits(out_channels, in_channels, d, dtype=torch.float64, seed=seed + 1)
    return reps[:learned], weight


def check_expansion(
    emulated,
    reps64,
    weight64,
    k,
    dtype,
    leading_identity,
    split_rows=0,
    *,
    channels_last=False,
    kernel_dtype=None,
):
    """The emulated kernel and both gradients, as accurate (vs float64) as the same-dtype reference. The
    kernel is written, and its gradient read, in ``kernel_dtype`` (default: ``dtype``), channels_last or
    contiguous."""
    kernel_dtype = kernel_dtype or dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    reps64, weight64 = reps64.clone().requires_grad_(), weight64.clone().requires_grad_()
    stack = prepend_identity if leading_identity else (lambda r: r)
    truth = expand_kernel_reference(stack(reps64), weight64, k)
    grad = make_logits(*truth.shape, dtype=torch.float64, seed=11).to(kernel_dtype)
    truth_grads = torch.autograd.grad(truth, (reps64, weight64), grad.to(torch.float64))
    low = [t.detach().to(dtype).requires_grad_() for t in (reps64, weight64)]
    expected = expand_kernel_reference(stack(low[0]), low[1], k)
    expected_grads = torch.autograd.grad(expected, low, grad.to(dtype))

    kernel = torch.full(truth.shape, float("nan"), dtype=kernel_dtype).contiguous(memory_format=layout)
    emulated.expand_forward(low[0].detach(), low[1].detach(), leading_identity, kernel)
    grads = emulated.expand_backward(
        grad.contiguous(memory_format=layout), low[0].detach(), low[1].detach(), leading_identity, split_rows
    )
    assert kernel.is_contiguous(memory_format=layout) and not kernel.isnan().any(), (
        "a kernel element was not written"
    )
    assert_as_accurate_as_reference(kernel, expected.detach().to(kernel_dtype), truth.detach())
    for got, want, exact in zip(grads, expected_grads, truth_grads, strict=True):
        assert got.dtype == dtype and not got.isnan().any(), "a gradient element was not written"
        assert_as_accurate_as_reference(got, want, exact)


@pytest.mark.parametrize("shape", EXPANSION_SHAPES, ids=lambda s: "G{}-Gin{}-k{}-O{}-I{}".format(*s))
def test_emulated_expansion_matches_reference(emulated, shape):
    reps, weight = expansion_inputs(*shape)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for leading_identity in (False, True):
            if shape[0] == 0 and not leading_identity:
                continue  # an empty stack: no kernel
            check_expansion(emulated, reps, weight, shape[2], dtype, leading_identity)


# I·G_in > 1 in each: with one input channel, channels_last and contiguous are the same memory.
CHANNELS_LAST_SHAPES = [(4, 1, 3, 2, 2), (1, 4, 3, 1, 3), (4, 4, 3, 2, 2), (3, 1, 5, 8, 3), (1, 2, 3, 13, 10),
                        (2, 1, 3, 35, 2)]  # fmt: skip


@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=lambda s: "G{}-Gin{}-k{}-O{}-I{}".format(*s))
def test_emulated_expansion_writes_and_reads_channels_last(emulated, shape):
    """A channels_last kernel (written through the transposed tile) and gradient (staged along the rows),
    with row tiles cut at their edge (O·I = 70 and 130) and input groups interleaved with the channels
    (G_in = 2, 4)."""
    assert shape[1] * shape[4] > 1
    reps, weight = expansion_inputs(*shape, seed=2)
    for dtype in (torch.float32, torch.bfloat16):
        for leading_identity in (False, True):
            check_expansion(emulated, reps, weight, shape[2], dtype, leading_identity, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_dtype", [torch.float16, torch.bfloat16])
def test_emulated_expansion_in_the_convolutions_dtype(emulated, kernel_dtype, channels_last):
    """float32 reps and weight, the kernel and its gradient in the half type of an autocast convolution: the
    kernel as accurate as the float32 one rounded once, the gradients as accurate as float32 ones."""
    reps, weight = expansion_inputs(3, 2, 3, 5, 3, seed=8)
    for leading_identity in (False, True):
        check_expansion(
            emulated, reps, weight, 3, torch.float32, leading_identity,
            channels_last=channels_last, kernel_dtype=kernel_dtype,
        )  # fmt: skip


@pytest.mark.parametrize("split_rows", [16, 32, 48])
def test_emulated_expansion_sums_split_reductions_in_order(emulated, split_rows):
    """The grad_reps reduction over (o, i) cut into runs (the last one short) summed by the second kernel: the
    same gradient, and the same bits on every call."""
    reps, weight = expansion_inputs(2, 1, 3, 7, 11, seed=4)
    check_expansion(emulated, reps, weight, 3, torch.float32, True, split_rows=split_rows)
    grad = make_logits(7 * 3, 11, 3, 3, seed=5)
    args = (grad, reps.float(), weight.float(), True, split_rows)
    first = emulated.expand_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, emulated.expand_backward(*args), strict=True))
    whole = emulated.expand_backward(grad, reps.float(), weight.float(), True, 0)
    torch.testing.assert_close(first[0], whole[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(first[1], whole[1])  # grad_weight does not depend on the split


def test_emulated_expansion_matches_the_native_cpu_kernels(emulated):
    if not _native.native_status().loaded:
        pytest.fail(f"the native CPU kernels are unavailable: {_native.native_status().reason}")
    reps, weight = (t.float() for t in expansion_inputs(3, 4, 3, 5, 4, seed=6))
    grad = make_logits(5 * 4, 4 * 4, 3, 3, seed=7)
    library = _native.library()
    want = torch.empty(5 * 4, 4 * 4, 3, 3)
    library.expand_forward(reps, weight, 3, True, want)
    want_grads = library.expand_backward(grad, reps, weight, 3, True)
    got = torch.full_like(want, float("nan"))
    emulated.expand_forward(reps, weight, True, got)
    got_grads = emulated.expand_backward(grad, reps, weight, True, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Launch plans of the block kernels (csrc/sinkhorn/sinkhorn_cuda_block_plan.h), with a driver that counts what
# it is asked. An H100: sm_90, 132 multiprocessors, 227 KB of shared memory per block (opt-in).
H100 = (9, 132, 232448)


def plans(emulated, calls, *, backward=False, device=H100, max_cluster=8):
    """Per call: ((cluster, shared bytes), limit raises, last limit, fit queries), counts over all calls."""
    return [
        ((cluster, shared), raises, limit, queries)
        for cluster, shared, raises, limit, queries in emulated.plan_block_calls(
            calls, backward, *device, max_cluster
        )
    ]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_block_launches_are_planned_once_per_shape_class(emulated, backward):
    """The driver is asked on the first call of a (device, kernel, max n, matrices class) only, so that calls
    (and CUDA-graph captures) after it make no driver query; the kernel's shared memory limit is raised once
    per device, to the device's maximum (a limit set to each launch's bytes would be lowered under a graph
    captured with a larger launch)."""
    calls = [
        [0, 784, 1],  # few large matrices: a cluster
        [0, 784, 1],
        [0, 600, 1],  # the same kernel (CT = 32), another size: planned, the limit already raised
        [0, 784, 2],
        [1, 784, 1],  # another device: its own limit and plans
        [0, 100, 4096],  # another kernel (CT = 4), many matrices
        [0, 100, 8192],  # as many matrices as multiprocessors or more: one class
        [0, 784, 1],
    ]
    got = plans(emulated, calls, backward=backward)
    launches, raises, limits, queries = (list(column) for column in zip(*got, strict=True))
    assert raises == [1, 1, 1, 1, 2, 3, 3, 3]
    assert set(limits) == {H100[2]}
    assert queries[1] == queries[0] > 0  # the repeat is a lookup
    assert queries[7] == queries[6] == queries[5]  # no cluster query for a full device; then lookups
    assert launches[1] == launches[0] == launches[4] == launches[7] and launches[0][0] > 1
    assert launches[5] == launches[6] and launches[5][0] == 1


def test_block_launch_plans_follow_the_device(emulated):
    """Before Hopper there are no clusters (and no query); a device that fits smaller clusters gets them."""
    calls = [[0, 784, 1], [0, 300, 3]]
    ampere = plans(emulated, calls, device=(8, 108, 166912))
    assert [launch[0] for launch, *_ in ampere] == [1, 1] and ampere[-1][3] == 0
    hopper = plans(emulated, calls)
    narrow = plans(emulated, calls, max_cluster=2)
    assert hopper[0][0][0] == 8 and narrow[0][0][0] == 2
    for launch, *_ in hopper + narrow:
        assert launch[1] <= H100[2]


# ------------------------------------------------------------------------------------------------------------
# The hyper-connection workload: [262144, n, n] for n = 4 and 8 at T = 20, too large to emulate whole; a few
# blocks of each launch run (the first, one in the middle, the last), which checks the grid and the indexing
# up to the last matrix.


@pytest.mark.parametrize("n", [4, 8])
def test_emulated_small_kernels_at_hyper_connection_batches(emulated, n):
    batch, n_iter, threads = 262_144, 20, 128  # kSmallThreads
    per_block = threads // n  # a group of S = n lanes per matrix
    grid = batch // per_block
    blocks = [0, grid // 2, grid - 1]
    logits = make_logits(batch * n * n, seed=n)
    grad = make_logits(batch * n * n, seed=n + 1)
    p, cols, domain, iterations, grad_logits = run(
        emulated, logits, [n], [batch], n_iter, 1.0, grad=grad, launch=(1, 0), blocks=blocks
    )
    served = torch.cat([torch.arange(b * per_block, (b + 1) * per_block) for b in blocks])
    unserved = torch.ones(batch, dtype=torch.bool)
    unserved[served] = False
    p, grad_logits = p.view(batch, n, n), grad_logits.view(batch, n, n)
    assert bool(p[unserved].isnan().all()) and bool((iterations[unserved] == -7).all())
    assert bool((iterations[served] == n_iter).all()) and bool((domain[served] == 0).all())
    x64 = logits.view(batch, n, n)[served].double().requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    g = grad.view(batch, n, n)[served]
    truth, expected = sinkhorn_reference(x64, n_iter), sinkhorn_reference(x32, n_iter)
    (truth_grad,) = torch.autograd.grad(truth, x64, g.double())
    (expected_grad,) = torch.autograd.grad(expected, x32, g)
    assert_as_accurate_as_reference(p[served], expected.detach(), truth.detach())
    assert_as_accurate_as_reference(grad_logits[served], expected_grad, truth_grad)
