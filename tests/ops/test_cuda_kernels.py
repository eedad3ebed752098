"""The native CUDA Sinkhorn and kernel-expansion kernels on a GPU (every test here needs one: marked
``cuda``, skipped without).

The parity matrices (every GPU size, T, dtype, the tolerance exit, NaN-poisoned outputs) are
test_sinkhorn.py::test_gpu_parity_matrix and test_expansion.py with the ``cuda`` implementation; this
module adds what is specific to the native kernels: ragged calls that mix every kernel family, and
expansions cut into many tiles and reduction runs, against the native CPU kernels, the launch contract
(current stream, no host synchronisation, CUDA-graph capture, torch.compile), determinism, the size limit,
and the workload that scripts/gpu_check.sh runs under compute-sanitizer (``-k sanitizer``).
"""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels import _native, backends
from tests.testing import make_logits

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def cuda_kernels():
    status = backends.backend_status()["cuda"]
    if not status.usable:
        pytest.fail(f"a GPU is visible but the cuda backend is unusable: {status.detail}")


def ragged(sizes, counts, device, seed=0, scale=1.0):
    flat = torch.cat(
        [make_logits(c * n * n, seed=seed + n, scale=scale) for n, c in zip(sizes, counts, strict=True)]
    )
    return flat.to(device)


def stacks_of(flat, sizes, counts):
    """The [c, n, n] stacks laid back to back in ``flat``."""
    pieces = flat.split([c * n * n for n, c in zip(sizes, counts, strict=True)])
    return [piece.view(c, n, n) for piece, n, c in zip(pieces, sizes, counts, strict=True)]


def native(flat, sizes, counts, n_iter, tau, tol=0.0, caps=None, grad=None):
    """The native pair on the stacks in ``flat``; P and the gradient packed like ``flat``."""
    library = _native.library()
    stacks = stacks_of(flat, sizes, counts)
    p, *state = library.sinkhorn_forward(stacks, n_iter, tau, tol, False, caps)
    grad_logits = None
    if grad is not None:
        grads = library.sinkhorn_backward(stacks_of(grad, sizes, counts), stacks, *state, tau)
        grad_logits = torch.cat([g.reshape(-1) for g in grads])
    return (torch.cat([q.reshape(-1) for q in p]), *state, grad_logits)


# Every family and width in one call: small groups of 2..32 lanes, block widths 2..32, stacks of one size
# split apart, an empty stack, and a spread-out matrix that takes the log domain.
SIZES = [3, 40, 17, 3, 0, 70, 130, 300, 600, 1, 1024]
COUNTS = [5, 3, 4, 2, 0, 2, 2, 1, 1, 3, 1]


@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_ragged_call_matches_the_native_cpu_kernels(tol):
    sizes = [max(n, 1) for n in SIZES]
    flat = ragged(sizes, COUNTS, "cpu", seed=1)
    flat[: 3 * 3] *= 80.0  # the first matrix: too spread out for the scaling domain
    grad = make_logits(flat.numel(), seed=2)
    want = native(flat, sizes, COUNTS, 12, 0.8, tol, grad=grad)
    got = native(flat.cuda(), sizes, COUNTS, 12, 0.8, tol, grad=grad.cuda())
    got = [t.cpu() for t in got]
    assert got[2].tolist() == want[2].tolist() and want[2][0] == 1
    assert torch.equal(got[3], want[3])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[4], want[4], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_types_are_computed_in_float32(dtype):
    sizes, counts = [7, 100], [3, 2]
    flat = ragged(sizes, counts, "cpu", seed=3).to(dtype)
    got = native(flat.cuda(), sizes, counts, 10, 1.0)
    want = native(flat.float(), sizes, counts, 10, 1.0)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0].cpu().float(), want[0], rtol=0, atol=2 * torch.finfo(dtype).eps)


def capture(step):
    """``step`` captured in a CUDA graph after one warm-up run on a side stream (allocator, caches); returns
    the graph and the outputs it writes on every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def test_caps_are_honoured_and_clamped():
    sizes, counts = [5, 50], [2, 2]
    flat = ragged(sizes, counts, "cuda")
    caps = torch.tensor([3, 0, 99, 4], dtype=torch.int32, device="cuda")
    iterations = native(flat, sizes, counts, 8, 1.0, caps=caps)[3]
    assert iterations.tolist() == [3, 1, 8, 4]


def test_runs_on_the_current_stream_without_host_synchronisation():
    """Queued behind a long kernel on a side stream, the call returns before that kernel ends (a host sync
    would wait for it), and its results are those of the default stream."""
    sizes, counts = [25, 196], [8, 2]
    flat = ragged(sizes, counts, "cuda", seed=4)
    grad = make_logits(flat.numel(), seed=5).cuda()
    want = native(flat, sizes, counts, 20, 1.0, grad=grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
        got = native(flat, sizes, counts, 20, 1.0, grad=grad)
        queued = not stream.query()
    stream.synchronize()
    assert queued, "the call synchronised with the device"
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_results_are_deterministic():
    sizes, counts = [16, 64, 256, 784], [64, 8, 2, 1]
    flat = ragged(sizes, counts, "cuda", seed=6)
    grad = make_logits(flat.numel(), seed=7).cuda()
    first = native(flat, sizes, counts, 20, 1.0, grad=grad)
    second = native(flat, sizes, counts, 20, 1.0, grad=grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [9, 100])
def test_cuda_graph_capture_and_replay(n):
    logits = make_logits(16, n, n, seed=n).cuda().requires_grad_()
    grad = make_logits(16, n, n, seed=1).cuda()

    def step():
        p = symkernels.sinkhorn(logits, 20, 1.0, backend="cuda", check_finite=False)
        (g,) = torch.autograd.grad(p, logits, grad)
        return p, g

    want = step()
    graph, captured = capture(step)
    with torch.no_grad():
        logits.copy_(make_logits(16, n, n, seed=n + 1))
    graph.replay()
    torch.cuda.synchronize()
    again = step()
    assert not torch.equal(again[0], want[0])
    assert torch.equal(captured[0], again[0]) and torch.equal(captured[1], again[1])


def test_first_plan_of_a_shape_inside_graph_capture():
    """A block launch planned for the first time during CUDA-graph capture (n = 333 appears nowhere else; two
    matrices take a cluster on Hopper): the plan's driver queries run in the relaxed capture mode, the capture
    holds, and its replay gives the eager results."""
    sizes, counts = [333], [2]
    flat = ragged(sizes, counts, "cuda", seed=11)
    grad = make_logits(flat.numel(), seed=12).cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = native(flat, sizes, counts, 5, 1.0, grad=grad)
    graph.replay()
    torch.cuda.synchronize()
    want = native(flat, sizes, counts, 5, 1.0, grad=grad)
    for a, b in zip(captured, want, strict=True):
        assert torch.equal(a, b)


def test_graph_replays_after_smaller_launches_of_its_kernels():
    """A graph captured with a block launch of large shared memory replays correctly after eager launches of
    the same kernels (CT = 32) with less: the kernels' shared memory limit is set once, to the device's
    maximum, not to each launch's bytes."""
    big, small = ragged([700], [1], "cuda", seed=13), ragged([520], [1], "cuda", seed=14)
    grad = make_logits(big.numel(), seed=15).cuda()
    graph, captured = capture(lambda: native(big, [700], [1], 5, 1.0, grad=grad))
    native(small, [520], [1], 5, 1.0, grad=make_logits(small.numel(), seed=16).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = native(big, [700], [1], 5, 1.0, grad=grad)
    for a, b in zip(captured, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [4, 8])
def test_hyper_connection_batches(n):
    """[262144, n, n] at T = 20, forward and backward (the hyper-connection workload: small-group launches of
    8192 and 16384 CTAs): every matrix, up to the last, against the native CPU kernels (float64)."""
    x = make_logits(262_144, n, n, seed=n, scale=2.0)
    grad = make_logits(262_144, n, n, seed=n + 1)
    got_x = x.cuda().requires_grad_()
    got, iterations = symkernels.sinkhorn(got_x, 20, backend="cuda", return_iterations=True)
    (got_grad,) = torch.autograd.grad(got, got_x, grad.cuda())
    x64 = x.double().requires_grad_()
    want = symkernels.sinkhorn(x64, 20, backend="cpu")
    (want_grad,) = torch.autograd.grad(want, x64, grad.double())
    assert bool((iterations == 20).all())
    torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_grad.cpu().double(), want_grad, rtol=1e-3, atol=1e-5)


def test_torch_compile_fullgraph():
    logits = make_logits(4, 36, 36, seed=8).cuda().requires_grad_()

    def f(x):
        return symkernels.sinkhorn(x, 20, 0.7, backend="cuda", check_finite=False).square().sum()

    eager = torch.autograd.grad(f(logits), logits)[0]
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(logits), logits)[0]
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)


def test_opcheck():
    sizes, counts = [4, 40], [2, 1]
    stacks = [s.requires_grad_() for s in stacks_of(ragged(sizes, counts, "cuda"), sizes, counts)]
    for tol, stop in ((0.0, "matrix"), (1e-3, "stack")):
        torch.library.opcheck(
            torch.ops.symkernels.sinkhorn.default, (stacks, 5, 1.0, tol, stop, None, "cuda")
        )


def test_sizes_past_the_limit():
    """n > 1024: an explicit cuda choice raises with the reason; the automatic choice passes it over."""
    logits = make_logits(1, 1025, 1025).cuda()
    with pytest.raises(RuntimeError, match="up to n = 1024"):
        symkernels.sinkhorn(logits, 1, backend="cuda")
    assert backends.resolve(None, logits.device, logits.dtype, "sinkhorn", 1025) != "cuda"
    assert backends.resolve(None, logits.device, logits.dtype, "sinkhorn", 1024) == "cuda"


@pytest.mark.parametrize("launch", ["small", "block", "cluster", "log"])
def test_sanitizer_workload(launch):
    """A short forward and backward per kernel path, for compute-sanitizer (memcheck, racecheck): small
    groups, one CTA per matrix, clusters and rows past shared memory (few large matrices), the log domain."""
    sizes, counts, scale = {
        "small": ([3, 9, 25], [7, 3, 2], 1.0),
        "block": ([36, 100, 196], [40, 40, 40], 1.0),
        "cluster": ([392, 784], [1, 1], 1.0),
        "log": ([6, 64], [3, 2], 80.0),
    }[launch]
    flat = ragged(sizes, counts, "cuda", seed=9, scale=scale)
    grad = make_logits(flat.numel(), seed=10).cuda()
    out = native(flat, sizes, counts, 3, 1.0, tol=1e-3, grad=grad)
    torch.cuda.synchronize()
    assert bool(out[0].isfinite().all()) and bool(out[4].isfinite().all())
    if launch == "log":
        assert bool((out[2] == 1).all())


# Kernel expansion. (G', G_in, k, O, I): many row and column tiles (d = 196: 64 + 64 + 64 + 4 columns) and a
# grad_reps reduction over O * I = 4096 rows cut into runs summed by a second kernel; a lifting layer (I = 1);
# only the identity (G' = 0).
EXPANSION_SHAPES = [(3, 4, 7, 64, 64), (3, 1, 5, 48, 1), (0, 1, 3, 5, 6)]


def expansion_inputs(learned, in_groups, k, out_channels, in_channels, seed=0):
    d = in_groups * k * k
    reps = torch.softmax(make_logits(learned, d, d, seed=seed, scale=2.0), dim=-1)
    weight = make_logits(out_channels, in_channels, d, seed=seed + 1)
    groups = learned + 1
    grad = make_logits(out_channels * groups, in_channels * in_groups, k, k, seed=seed + 2)
    return reps, weight, grad


def expand_native(reps, weight, grad, k, *, memory_format=torch.contiguous_format):
    """The native kernel (written in ``memory_format``, in reps' dtype) and both gradients."""
    library = _native.library()
    kernel = torch.empty(grad.shape, dtype=reps.dtype, device=reps.device, memory_format=memory_format)
    library.expand_forward(reps, weight, k, True, kernel)
    return (kernel, *library.expand_backward(grad, reps, weight, k, True))


@pytest.mark.parametrize("shape", EXPANSION_SHAPES, ids=["gconv-split", "lift", "identity"])
def test_expansion_matches_the_native_cpu_kernels(shape):
    reps, weight, grad = expansion_inputs(*shape)
    want = expand_native(reps, weight, grad, shape[2])
    got = expand_native(reps.cuda(), weight.cuda(), grad.cuda(), shape[2])
    strided = expand_native(
        reps.cuda(),
        weight.cuda(),
        grad.cuda().contiguous(memory_format=torch.channels_last),
        shape[2],
        memory_format=torch.channels_last,
    )
    assert strided[0].is_contiguous(memory_format=torch.channels_last)
    for a, b, c in zip(got, want, strided, strict=True):
        # Sums of up to 4096 terms in another order: float32 rounding relative to the result's scale.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_expansion_half_types_are_computed_in_float32(dtype):
    reps, weight, grad = (t.to(dtype) for t in expansion_inputs(3, 4, 3, 20, 24, seed=3))
    got = expand_native(reps.cuda(), weight.cuda(), grad.cuda(), 3)
    want = expand_native(reps.float(), weight.float(), grad.float(), 3)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        scale = b.abs().max().item()
        torch.testing.assert_close(a.cpu().float(), b, rtol=0, atol=2 * torch.finfo(dtype).eps * scale)


def test_expansion_runs_on_the_current_stream_without_host_synchronisation():
    reps, weight, grad = (t.cuda() for t in expansion_inputs(3, 4, 5, 32, 32, seed=4))
    want = expand_native(reps, weight, grad, 5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
        got = expand_native(reps, weight, grad, 5)
        queued = not stream.query()
    stream.synchronize()
    assert queued, "the call synchronised with the device"
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_expansion_backward_is_deterministic():
    reps, weight, grad = (t.cuda() for t in expansion_inputs(3, 4, 7, 64, 64, seed=6))
    first = expand_native(reps, weight, grad, 7)
    for _ in range(2):
        again = expand_native(reps, weight, grad, 7)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_expansion_cuda_graph_capture_and_replay():
    reps, weight, grad = (t.cuda() for t in expansion_inputs(3, 4, 5, 32, 16, seed=7))
    reps.requires_grad_()
    weight.requires_grad_()

    def step():
        kernel = symkernels.expand_kernel(reps, weight, 5, leading_identity=True, backend="cuda")
        return (kernel, *torch.autograd.grad(kernel, (reps, weight), grad))

    want = step()
    graph, captured = capture(step)
    with torch.no_grad():
        weight.copy_(make_logits(*weight.shape, seed=8))
    graph.replay()
    torch.cuda.synchronize()
    again = step()
    assert not torch.equal(again[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(captured, again, strict=True))


def test_expansion_torch_compile_fullgraph():
    reps, weight, _ = (t.cuda() for t in expansion_inputs(3, 1, 5, 8, 1, seed=9))
    weight.requires_grad_()

    def f(w):
        return symkernels.expand_kernel(reps, w, 5, leading_identity=True, backend="cuda").square().sum()

    eager = torch.autograd.grad(f(weight), weight)[0]
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(weight), weight)[0]
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", EXPANSION_SHAPES, ids=["gconv-split", "lift", "identity"])
def test_expansion_sanitizer_workload(shape):
    """A forward and backward per launch shape of the expansion kernels, for compute-sanitizer: tiles cut at
    every edge, the split grad_reps reduction and its sum, the identity alone; contiguous and channels_last
    (the transposed store through shared memory)."""
    reps, weight, grad = (t.cuda() for t in expansion_inputs(*shape, seed=10))
    for layout in (torch.contiguous_format, torch.channels_last):
        out = expand_native(
            reps, weight, grad.contiguous(memory_format=layout), shape[2], memory_format=layout
        )
        torch.cuda.synchronize()
        assert all(bool(t.isfinite().all()) for t in out)
