"""Sinkhorn: doubly stochastic matrices from logits, for any number of stacks of any sizes in one call.

The op family, the same contract on every device::

    symkernels::sinkhorn(stacks, n_iter, tau, tol, stop, caps, backend) -> (p, cols, domain, iterations)
    symkernels::sinkhorn_backward(grad_p, stacks, cols, domain, iterations, tau, backend) -> grad_stacks

``stacks`` is a list of ``[G_l, n_l, n_l]`` logits (sizes may differ; a single stack is the case of one
entry), ``M = Σ G_l`` matrices numbered stack by stack; ``p`` and the gradients are lists like it. Each
matrix is iterated (rows, then columns) in the scaling domain, or in the log domain when its logits are too
spread out for it, until its rows sum to 1 within ``tol`` (``tol = 0``: no test) or its cap (``caps[m]``,
else ``n_iter``) is reached; the test is decided on the device, per matrix, without host synchronisation.
With ``stop="stack"`` every matrix then runs as many iterations as the slowest matrix of its stack (within
its cap): the CPU kernel runs the lagging matrices again, the GPU implementations run the call again with
those caps. The forward saves what the exact backward needs: ``cols [M, n_iter, max n]`` (float64: each
iteration's column scalings, ``c_t`` or ``g_t``, zero past the last iteration), ``domain [M]`` (0 scaling,
1 log) and ``iterations [M]``; the backward, the exact vector-Jacobian product of the iterations each matrix
ran, recomputes the row scalings from them. The CPU kernels save no column scalings for a call whose every
matrix has n <= ``RECOMPUTED_MAX_SIZE`` (8): ``cols`` is ``[M, n_iter, 0]`` and their backward recomputes
them from the logits (it takes either width; any other width is an error). The CPU kernels read and write
the stacks where they are; the GPU kernels read one packed buffer.

Implementations: ``cpu`` and ``cuda`` (the native library's ``sinkhorn_forward``/``sinkhorn_backward``),
``triton`` (:mod:`symkernels.ops.sinkhorn_triton`); ``backend`` names one of them (``"auto"``: chosen by
:func:`symkernels.backends.resolve`). The pure-PyTorch ``reference`` is called directly by :func:`sinkhorn`.

Where the calls run: the native library registers the ops' CPU, CUDA and Autograd kernels in C++
(``csrc/sinkhorn/sinkhorn_op.cpp``), so that a call of the native kernels never enters Python between the
caller and the kernel, forward or backward; they hand every other call (``"triton"``, ``"auto"``, a choice
that cannot serve the tensors) to :func:`_python_forward` / :func:`_python_backward`. Without the native
library these two are the CPU and CUDA kernels, and the autograd formula is registered from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symkernels import backends
from symkernels._checks import (
    check_all_finite,
    check_positive_int,
    check_square_stack,
    check_stack_list,
    check_tau,
    check_tensor,
)
from symkernels._checks import (
    check_finite as _check_finite,
)
from symkernels.ops.python_kernels import register_python_kernels
from symkernels.reference.sinkhorn import STOP_RULES, sinkhorn_reference

__all__ = ["BACKWARD_MODES", "fixed_point_vjp", "grouped_sinkhorn", "sinkhorn"]

BACKWARD_MODES = ("unrolled", "implicit")

# The largest n of a native CPU call that saves no column scalings (csrc/sinkhorn/sinkhorn.h,
# kRecomputedMaxSize): its backward recomputes them, cheaper than saving T n doubles per matrix.
RECOMPUTED_MAX_SIZE = 8

torch.library.define(
    "symkernels::sinkhorn",
    "(Tensor[] stacks, int n_iter, float tau, float tol, str stop, Tensor? caps, str backend)"
    " -> (Tensor[], Tensor, Tensor, Tensor)",
)
torch.library.define(
    "symkernels::sinkhorn_backward",
    "(Tensor[] grad_p, Tensor[] stacks, Tensor cols, Tensor domain, Tensor iterations, float tau,"
    " str backend) -> Tensor[]",
)


_FORWARD = torch.ops.symkernels.sinkhorn.default
_BACKWARD = torch.ops.symkernels.sinkhorn_backward.default


class _Triton:
    """:mod:`symkernels.ops.sinkhorn_triton` on the stacks packed into one buffer; the stack rule is a second
    launch, capped per stack."""

    @staticmethod
    def forward(stacks, n_iter, tau, tol, stop, caps):
        from symkernels.ops import sinkhorn_triton

        flat, sizes, counts = _packed(stacks)
        outputs = sinkhorn_triton.forward(flat, sizes, counts, n_iter, tau, tol, caps)
        if stop == "stack" and tol > 0:
            stack_caps = _stack_caps(outputs[3], counts)
            if caps is not None:
                stack_caps = torch.minimum(stack_caps, caps)
            outputs = sinkhorn_triton.forward(flat, sizes, counts, n_iter, tau, 0.0, stack_caps)
        p, cols, domain, iterations = outputs
        return _unpacked(p, stacks), cols, domain, iterations

    @staticmethod
    def backward(grad_p, stacks, cols, domain, iterations, tau):
        from symkernels.ops import sinkhorn_triton

        flat, sizes, counts = _packed(stacks)
        grad = sinkhorn_triton.backward(
            _packed(grad_p)[0], flat, sizes, counts, cols, domain, iterations, tau
        )
        return _unpacked(grad, stacks)


def _packed(stacks: list[torch.Tensor]) -> tuple[torch.Tensor, list[int], list[int]]:
    """The stacks as one contiguous buffer of matrices back to back, with their sizes and counts. An empty
    stack counts as n = 1, so that ``cols`` is as wide as the largest matrix, as on every other device."""
    flat = torch.cat([s.reshape(-1) for s in stacks]) if len(stacks) > 1 else stacks[0].reshape(-1)
    sizes = [s.shape[-1] if s.shape[0] > 0 else 1 for s in stacks]
    return flat.contiguous(), sizes, [s.shape[0] for s in stacks]


def _unpacked(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut into tensors shaped like ``like``; each its own tensor (no two outputs alias)."""
    pieces = [
        piece.view(x.shape) for piece, x in zip(flat.split([x.numel() for x in like]), like, strict=True)
    ]
    return pieces if len(pieces) == 1 else [piece.clone() for piece in pieces]


def _implementation(backend: str, stacks: list[torch.Tensor], op: str) -> str:
    """The backend that runs ``op`` for ``backend`` (a name, or ``"auto"``) on ``stacks``; raises if none."""
    first = stacks[0]
    name = backends.resolve(None if backend == "auto" else backend, first.device, first.dtype, op)
    if name == "reference":
        raise RuntimeError(
            f"{op} has no {first.device.type} {first.dtype} kernel here "
            f"({backends.backend_status()['cpu'].detail}); symkernels.sinkhorn(..., backend='reference') "
            "computes it in pure PyTorch"
        )
    return name


def _python_forward(stacks, n_iter, tau, tol, stop, caps, backend):
    """``symkernels::sinkhorn`` where the native kernels do not run it: Triton, an automatic choice (resolved
    here, then run by name), a choice that cannot serve (its error)."""
    if stop not in STOP_RULES:
        raise ValueError(f"symkernels::sinkhorn: stop must be one of {STOP_RULES}, got {stop!r}")
    name = _implementation(backend, stacks, "sinkhorn")
    if name == "triton":
        return _Triton.forward(stacks, n_iter, tau, tol, stop, caps)
    return _FORWARD(stacks, n_iter, tau, tol, stop, caps, name)


def _python_backward(grad_p, stacks, cols, domain, iterations, tau, backend):
    """``symkernels::sinkhorn_backward`` where the native kernels do not run it (see the forward)."""
    name = _implementation(backend, stacks, "sinkhorn_backward")
    if name == "triton":
        return _Triton.backward(grad_p, stacks, cols, domain, iterations, tau)
    return _BACKWARD(grad_p, stacks, cols, domain, iterations, tau, name)


@torch.library.register_fake("symkernels::sinkhorn")
def _(stacks, n_iter, tau, tol, stop, caps, backend):
    matrices = sum(s.shape[0] for s in stacks)
    max_n = max((s.shape[-1] for s in stacks if s.shape[0] > 0), default=0)
    options = {"device": stacks[0].device} if stacks else {}
    flags = torch.empty((matrices,), dtype=torch.int32, **options)
    width = 0 if _saves_no_cols(stacks, max_n, backend) else max_n
    cols = torch.empty((matrices, n_iter, width), dtype=torch.float64, **options)
    # Every implementation returns contiguous results, whatever the stacks' strides.
    return [_contiguous_like(s) for s in stacks], cols, flags, torch.empty_like(flags)


def _saves_no_cols(stacks: list[torch.Tensor], max_n: int, backend: str) -> bool:
    """Whether the call returns ``cols`` as ``[M, n_iter, 0]``: the native CPU kernel's calls whose every
    matrix has n <= RECOMPUTED_MAX_SIZE, whose backward recomputes the column scalings from the logits."""
    if not stacks or stacks[0].device.type != "cpu" or max_n > RECOMPUTED_MAX_SIZE:
        return False
    if backend != "auto":
        return backend == "cpu"
    try:
        return backends.resolve(None, stacks[0].device, stacks[0].dtype, "sinkhorn") == "cpu"
    except RuntimeError:  # the real call raises it
        return False


@torch.library.register_fake("symkernels::sinkhorn_backward")
def _(grad_p, stacks, cols, domain, iterations, tau, backend):
    return [_contiguous_like(s) for s in stacks]


def _contiguous_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    stacks, _, tau, _, _, _, backend = inputs
    _, cols, domain, iterations = output
    ctx.save_for_backward(*stacks, cols, domain, iterations)
    ctx.tau, ctx.backend = tau, backend
    ctx.mark_non_differentiable(cols, domain, iterations)


def _autograd(ctx, grad_p, grad_cols, grad_domain, grad_iterations):
    *stacks, cols, domain, iterations = ctx.saved_tensors
    # A stack whose P took no part in the loss has no gradient coming in.
    grad_p = [torch.zeros_like(s) if g is None else g for g, s in zip(grad_p, stacks, strict=True)]
    grads = _BACKWARD(grad_p, stacks, cols, domain, iterations, ctx.tau, ctx.backend)
    return grads, None, None, None, None, None, None


register_python_kernels("sinkhorn", _python_forward, _python_backward, _autograd, _setup_context)


# ------------------------------------------------------------------------------------------------------------
# The implicit gradient: the VJP of the converged map, for any forward.


def fixed_point_vjp(p: torch.Tensor, grad_p: torch.Tensor, tau: float) -> torch.Tensor:
    """VJP of the converged Sinkhorn map at P (``[B, n, n]``): ``P ⊙ (Ḡ − α1ᵀ − 1βᵀ) / τ``.

    ``(α, β)`` solve the linearised marginal constraints written with P's actual marginals, which makes the
    system consistent with exactly one redundant equation: drop it and fix ``β_n = 0``.
    """
    n = p.shape[-1]
    weighted = grad_p * p
    rhs = torch.cat([weighted.sum(-1), weighted.sum(-2)], dim=-1)[..., :-1]
    system = torch.zeros(*p.shape[:-2], 2 * n, 2 * n, dtype=p.dtype, device=p.device)
    system[..., :n, :n] = torch.diag_embed(p.sum(-1))
    system[..., :n, n:] = p
    system[..., n:, :n] = p.transpose(-1, -2)
    system[..., n:, n:] = torch.diag_embed(p.sum(-2))
    solution = torch.linalg.solve(system[..., :-1, :-1], rhs.unsqueeze(-1)).squeeze(-1)
    alpha = solution[..., :n]
    beta = torch.cat([solution[..., n:], solution.new_zeros(*solution.shape[:-1], 1)], dim=-1)
    return p * (grad_p - alpha.unsqueeze(-1) - beta.unsqueeze(-2)) / tau


class _ImplicitGradient(torch.autograd.Function):
    """``p`` (computed without gradients, by any backend) carrying the implicit gradient wrt ``logits``."""

    @staticmethod
    def forward(logits, p, tau):
        return p.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, p, tau = inputs
        ctx.save_for_backward(p)
        ctx.tau = tau

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        return fixed_point_vjp(p.to(compute), grad.to(compute), ctx.tau).to(p.dtype), None, None


# ------------------------------------------------------------------------------------------------------------
# The public functions: checks, the backend choice, the op (or the reference), the stack stopping rule.

_STACK_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _stack_index(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[M]``: the stack of each matrix, built on the device (no host-to-device copy inside a graph)."""
    key = (tuple(counts), str(device))
    index = None if torch.compiler.is_compiling() else _STACK_INDEX_CACHE.get(key)
    if index is None:
        parts = [torch.full((c,), s, dtype=torch.int64, device=device) for s, c in enumerate(counts)]
        index = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)
        if not torch.compiler.is_compiling():
            _STACK_INDEX_CACHE[key] = index
    return index


def _stack_caps(iterations: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Each matrix's cap: the most iterations any matrix of its stack ran."""
    index = _stack_index(counts, iterations.device)
    most = iterations.new_zeros(len(counts)).scatter_reduce(0, index, iterations, "amax", include_self=False)
    return most[index]


def _run_op(
    stacks: list[torch.Tensor], n_iter: int, tau: float, tol: float, stop: str, backend: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    p, _, _, iterations = _FORWARD(stacks, n_iter, tau, tol, stop, None, backend)
    return p, iterations


def _check_options(
    n_iter: object, tau: object, tol: object, stop: object, backward: object
) -> tuple[float, float]:
    check_positive_int(n_iter, "n_iter")
    tau = check_tau(tau)
    if tol is None:
        tol = 0.0
    elif isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol == float("inf"):
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    return tau, float(tol)


def sinkhorn(
    logits: torch.Tensor,
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    tol: float | None = None,
    stop: str = "matrix",
    backend: str | None = None,
    backward: str = "unrolled",
    check_finite: bool = False,
    return_iterations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Doubly stochastic matrices from ``[..., n, n]`` logits (log domain, rows then columns per iteration).

    Returns the input dtype; computes in float32 at least (float64 stays float64).

    ``tol``: a matrix stops after the first iteration whose row sums are all within ``tol`` of 1 (its columns
    sum to 1 after every iteration), or after ``n_iter``; decided on the device, per matrix. ``stop="stack"``
    makes every matrix run as many iterations as the slowest one (the authors' loop with
    ``tol=AUTHORS_TOLERANCE``). ``return_iterations=True`` also returns the iterations each matrix ran
    (int32, ``logits.shape[:-2]``).

    ``backward="unrolled"`` (default) is the exact gradient of the iterations that ran, equal to autograd
    through the loop; ``"implicit"`` differentiates the fixed point (the converged map), equal to it only once
    the forward has converged.

    A call reads nothing back from the device: a matrix whose logits hold NaN or Inf comes out NaN (the other
    matrices of the call are unaffected). ``check_finite=True`` raises
    :class:`~symkernels._checks.NonFiniteInputError` (a ``ValueError``) instead, at the cost of reading one
    flag from the device on every call: a host synchronisation on a GPU.
    """
    logits = check_tensor(logits, "logits")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    check_square_stack(logits, "logits")
    shape = logits.shape
    n = shape[-1]
    if n < 1:
        raise ValueError(f"logits must have n >= 1, got shape {tuple(shape)}")
    tau, tol = _check_options(n_iter, tau, tol, stop, backward)
    if check_finite:
        _check_finite(logits, "logits")
    name = backends.resolve(backend, logits.device, logits.dtype, "sinkhorn", n)
    source = logits.detach() if backward == "implicit" else logits
    if name == "reference":
        with torch.set_grad_enabled(torch.is_grad_enabled() and backward == "unrolled"):
            p, iterations = sinkhorn_reference(
                source, n_iter, tau, tol=tol, stop=stop, return_iterations=True
            )
    else:
        # One op call is one stack: stop="stack" treats the whole batch as one. A [G, n, n] stack goes as it
        # is (each view is an autograd node, forward and backward).
        stack = source if len(shape) == 3 else source.reshape(-1, n, n)
        stacks, iterations = _run_op([stack], n_iter, tau, tol, stop, name)
        p = stacks[0] if len(shape) == 3 else stacks[0].view(shape)
        if return_iterations:
            iterations = iterations.view(shape[:-2])
    if backward == "implicit":
        p = _ImplicitGradient.apply(logits, p, tau)
    return (p, iterations) if return_iterations else p


def grouped_sinkhorn(
    stacks: Sequence[torch.Tensor],
    n_iter: int = 20,
    tau: float = 1.0,
    *,
    tol: float | None = None,
    stop: str = "matrix",
    backend: str | None = None,
    check_finite: bool = False,
    return_iterations: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`sinkhorn` of every ``[G_l, n_l, n_l]`` stack of ``stacks`` (sizes may differ) in one op call.

    ``stop="stack"`` applies per stack. Gradients are the exact unrolled ones. With ``return_iterations``,
    also the list of iterations (int32 ``[G_l]``) per stack. ``check_finite`` as in :func:`sinkhorn` (one
    flag read for all the stacks).
    """
    checked = check_stack_list(stacks)
    tau, tol = _check_options(n_iter, tau, tol, stop, "unrolled")
    for index, stack in enumerate(checked):
        if stack.shape[-1] < 1:
            raise ValueError(f"stacks[{index}] must have n >= 1, got shape {tuple(stack.shape)}")
    if not checked:
        return ([], []) if return_iterations else []
    if check_finite:
        check_all_finite(checked)
    first = checked[0]
    max_size = max(stack.shape[-1] for stack in checked)
    name = backends.resolve(backend, first.device, first.dtype, "sinkhorn", max_size)
    if name == "reference":
        pairs = [
            sinkhorn_reference(s, n_iter, tau, tol=tol, stop=stop, return_iterations=True) for s in checked
        ]
        outputs, iterations = [p for p, _ in pairs], [i for _, i in pairs]
    else:
        outputs, flat_iterations = _run_op(checked, n_iter, tau, tol, stop, name)
        iterations = list(flat_iterations.split([s.shape[0] for s in checked])) if return_iterations else []
    return (outputs, iterations) if return_iterations else outputs
