"""``symkernels::sinkhorn``, the op contract on each implementation (conftest.py's ``implementation``):
the saved state, the stack rule, opcheck, torch.compile, and the memory the backward keeps."""

from __future__ import annotations

import pytest
import torch

import symkernels
from symkernels.ops.sinkhorn import RECOMPUTED_MAX_SIZE
from tests.testing import make_logits


def saved_state(impl, sizes, counts, n_iter, tol, caps=None, *, scale=1.0):
    stacks = [
        make_logits(c, n, n, seed=n, scale=scale).to(impl.device) for n, c in zip(sizes, counts, strict=True)
    ]
    caps = None if caps is None else torch.tensor(caps, dtype=torch.int32, device=impl.device)
    return stacks, torch.ops.symkernels.sinkhorn(stacks, n_iter, 1.0, tol, "matrix", caps, impl.name)


def test_stack_rule_runs_lagging_matrices_to_their_stacks_count(implementation):
    """stop="stack" computes what each matrix computes capped at its stack's most iterations (and its own
    cap): P, saved state and iterations, for stacks whose matrices stop at different counts, one in the log
    domain."""
    sizes, counts = [4, 3, 2], [3, 2, 1]
    stacks = [make_logits(c, n, n, scale=1.5, seed=n) for n, c in zip(sizes, counts, strict=True)]
    stacks[0][0] = torch.eye(4) * 0.01  # nearly doubly stochastic already: stops after one iteration
    stacks[1][1] *= 80.0  # spread out beyond the scaling domain
    stacks = [s.to(implementation.device) for s in stacks]
    user_caps = torch.tensor([20, 20, 3, 20, 20, 20], dtype=torch.int32, device=implementation.device)

    def op(stop, tol, caps):
        return torch.ops.symkernels.sinkhorn(stacks, 20, 1.0, tol, stop, caps, implementation.name)

    for caps in (None, user_caps):
        first = op("matrix", 1e-4, caps)[3].cpu()
        most = [int(part.max()) for part in first.split(counts)]
        expected_caps = torch.tensor([m for m, c in zip(most, counts, strict=True) for _ in range(c)])
        if caps is not None:
            expected_caps = torch.minimum(expected_caps, caps.cpu())
        assert len(set(first.tolist())) > 1 and not torch.equal(first, expected_caps)  # some matrices lag
        got = op("stack", 1e-4, caps)
        want = op("matrix", 0.0, expected_caps.to(torch.int32).to(implementation.device))
        assert torch.equal(got[3].cpu(), expected_caps.to(torch.int32))
        for a, b in zip([*got[0], *got[1:]], [*want[0], *want[1:]], strict=True):
            assert torch.equal(a.cpu(), b.cpu())


def test_the_op_rejects_an_unknown_stop_rule(implementation):
    stacks = [make_logits(1, 3, 3).to(implementation.device)]
    with pytest.raises(ValueError, match="stop must be one of"):
        torch.ops.symkernels.sinkhorn(stacks, 2, 1.0, 0.0, "all", None, implementation.name)


def cols_width(impl, max_n: int) -> int:
    """The width of ``cols``: max n, or 0 on the native CPU kernels when every matrix has n <= 8."""
    return 0 if impl.name == "cpu" and max_n <= RECOMPUTED_MAX_SIZE else max_n


def test_saved_state_layout(implementation):
    """cols [M, T, max n] (float64, zero past each matrix's iterations and size), domain, iterations [M]."""
    sizes, counts, n_iter = [3, 9], [2, 1], 6
    _, (p, cols, domain, iterations) = saved_state(implementation, sizes, counts, n_iter, 0.0, caps=[6, 2, 4])
    assert cols.shape == (3, n_iter, 9) and cols.dtype == torch.float64
    assert domain.dtype == torch.int32 and iterations.dtype == torch.int32 and domain.shape == (3,)
    assert iterations.tolist() == [6, 2, 4]
    cols = cols.cpu()
    assert (
        bool((cols[0, :, 3:] == 0).all())
        and bool((cols[1, 2:] == 0).all())
        and bool((cols[2, 4:] == 0).all())
    )
    assert bool((cols[0, :, :3] > 0).all())  # scaling domain: the column scalings c_t themselves


@pytest.mark.parametrize("n", [3, 9])
def test_an_empty_stack_does_not_widen_the_saved_state(implementation, n):
    """cols is as wide as the largest matrix there is (or 0: the CPU kernels' small matrices), as the fake
    says, whatever the empty stacks' n."""
    stacks = [
        make_logits(2, n, n).to(implementation.device),
        torch.zeros(0, 12, 12, device=implementation.device),
    ]
    _, cols, _, _ = torch.ops.symkernels.sinkhorn(stacks, 2, 1.0, 0.0, "matrix", None, implementation.name)
    assert cols.shape == (2, 2, cols_width(implementation, n))
    torch.library.opcheck(
        torch.ops.symkernels.sinkhorn.default, (stacks, 2, 1.0, 0.0, "matrix", None, implementation.name)
    )


@pytest.mark.parametrize("sizes", [[8], [2, 8], [4, 9], [1]])
def test_the_fake_gives_the_saved_states_shapes(implementation, sizes):
    """torch.compile's view of the op (its fake kernel) gives the shapes of the real outputs, at the sizes
    around the CPU kernels' rule (cols of width 0 for a call of matrices n <= 8), for backend="auto" too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    stacks = [make_logits(3, n, n, seed=n).to(implementation.device) for n in sizes]
    for backend in (implementation.name, "auto"):
        args = (stacks, 4, 1.0, 0.0, "matrix", None, backend)
        real = torch.ops.symkernels.sinkhorn(*args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = torch.ops.symkernels.sinkhorn(*args)
        assert [t.shape for t in fake[0]] == [t.shape for t in real[0]]
        assert [t.shape for t in fake[1:]] == [t.shape for t in real[1:]], (backend, sizes)
    assert real[1].shape[-1] in (0, max(sizes))


def test_backward_state_is_order_t_times_n_per_matrix(implementation):
    batch, n, n_iter = 3, 9, 20
    logits = make_logits(batch, n, n).to(implementation.device).requires_grad_()
    kept = saved_numel(lambda: symkernels.sinkhorn(logits, n_iter, backend=implementation.name))
    # The logits, T·n column scalings and two flags per matrix: never T copies of an n×n matrix.
    assert kept <= batch * n * n + batch * n_iter * n + 2 * batch
    reference = saved_numel(lambda: symkernels.sinkhorn(logits.cpu(), n_iter, backend="reference"))
    assert reference >= n_iter * batch * n * n  # what unrolled autograd keeps, for contrast


def test_small_matrices_backward_state(implementation):
    """[tokens, 4, 4]: the native CPU kernels keep the logits and two flags per matrix (their backward
    recomputes the column scalings), every other implementation T·n column scalings more."""
    batch, n, n_iter = 6, 4, 20
    logits = make_logits(batch, n, n).to(implementation.device).requires_grad_()
    kept = saved_numel(lambda: symkernels.sinkhorn(logits, n_iter, backend=implementation.name))
    assert kept <= batch * n * n + batch * n_iter * cols_width(implementation, n) + 2 * batch


def saved_numel(fn) -> int:
    """Elements kept for backward by ``fn``, counting each distinct buffer once."""
    buffers = {}

    def pack(tensor):
        buffers[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())] = (
            tensor.numel()
        )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(buffers.values())


@pytest.mark.smoke
def test_opcheck(implementation):
    sizes, counts = [5, 3], [3, 2]
    stacks, (p, cols, domain, iterations) = saved_state(implementation, sizes, counts, 3, 1e-3)
    xs = [s.requires_grad_() for s in stacks]
    for stop in ("matrix", "stack"):
        torch.library.opcheck(
            torch.ops.symkernels.sinkhorn.default, (xs, 3, 1.0, 1e-3, stop, None, implementation.name)
        )
    plain = [s.detach() for s in stacks]  # the backward op is not differentiable itself
    torch.library.opcheck(
        torch.ops.symkernels.sinkhorn_backward.default,
        ([torch.randn_like(q) for q in p], plain, cols, domain, iterations, 1.0, implementation.name),
    )


def test_torch_compile_fullgraph_matches_eager(implementation):
    stacks = [make_logits(3, n, n, seed=n).to(implementation.device).requires_grad_() for n in (4, 9)]

    def loss(a, b):
        first, second = symkernels.grouped_sinkhorn(
            [a, b], 3, backend=implementation.name, check_finite=False
        )
        return (first * first.log()).sum() + second.square().sum()

    # The ops are opaque to the compiler: aot_eager checks their fake and autograd registrations.
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_value = loss(*stacks)
    eager_grads = torch.autograd.grad(eager_value, stacks)
    value = compiled(*stacks)
    grads = torch.autograd.grad(value, stacks)
    torch.testing.assert_close(value, eager_value)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
