"""Toy symmetry discovery (docs/design.md §10): one weight-sharing layer learns a group from transformed
copies.

**Data.** ``channels`` random canonical signals ``x̂_c`` (standard normal, so almost surely all entries
differ and no group element fixes a signal) are stacked into one multi-channel sample. Each target group
element ``t_j`` contributes ``samples`` noisy copies ``x = P_{t_j} x̂ + noise·ε`` (``ε`` standard normal),
labelled ``j``. ``P_t`` are the exact permutations of :mod:`symkernels.groups`:

- ``shift1d``: cyclic shifts of a length-``size`` signal (default 8); partial: the first half of the shifts,
  ``shift0 … shift{size//2 − 1}`` (a subset that is not a subgroup, like the paper's partial rotations).
- ``rot2d``: the four quarter turns of a ``size × size`` grid (default 5; the rotations that are exact
  permutations of a square grid); partial: ``{rot0, rot90}``.
- ``cube``: the 24 proper rotations of a ``size³`` voxel cube (default 3, ``d = 27``). The partial variant
  reads "C4 × C4" as the image of the product map ``(a, b) ↦ z^a · x^b`` of the quarter turns about the z and
  x axes (``z^a`` applied after ``x^b``). The two C4s meet only in the identity, so this gives 16 distinct
  rotations: a subset of the 24, not a subgroup (``z:90`` and ``x:90`` generate the whole group).

**Layer and loss.** The layer owns a stack of ``|target|`` soft permutations ``R_j = Sinkhorn(Θ_j)``
(:class:`~symkernels.nn.DoublyStochasticStack`, identity fixed by default) and one canonical kernel ``θ``
``[channels, d]``; its expanded kernel is ``K_j = R_j θ`` (:func:`symkernels.functional.expand_kernel`, the
same op the convolution layers use). A sample labelled ``j`` is explained by copy ``j``: the loss is
``‖x − K_j‖²`` summed over channels and positions, averaged over samples. Since
``‖x − K_j‖² = ‖x‖² − 2⟨K_j, x⟩ + ‖K_j‖²``, this asks the layer's response at group index ``j`` (the
correlation with the full-size kernel) to be large on its own transformed copies, with a kernel-energy
penalty.

Why supervised matching rather than classification or an unlabelled loss: the answer is then unique. With
the identity fixed, the label-0 samples (the untransformed signals) pin ``θ`` to ``x̂``; and a doubly
stochastic ``R`` with ``R x̂ = P x̂`` must equal ``P`` when ``x̂`` has distinct entries (the row of ``R``
that produces the largest entry of ``P x̂`` averages entries of ``x̂``, so it must put all its weight on the
largest one; remove that row and column and repeat). A classifier over the responses, by contrast, only
needs ``R_j`` to *separate* the classes, and many soft matrices do. Several channels make the fit better
conditioned against the noise.

Training is full-batch Adam. ``θ`` starts at zero and the logits stay frozen for the first ``warmup``
steps: Adam moves the logits at a fixed rate however small their gradient, so a stack trained from the
start commits to permutations of a still tiny, unfitted kernel, and with 23 of 24 elements agreeing on a
wrong ``θ`` the single identity-labelled class cannot pull it back (seen on the cube).

**Recovery.** Every learned ``R_j`` is decomposed over the whole group (:func:`symkernels.analysis.decompose`:
``c ≥ 0, Σ c = 1``); ``R_j`` is assigned the element with the largest coefficient. The group (or the partial
subset) is recovered when every element puts at least ``threshold`` of its mass on its assigned element and
the assigned elements are distinct and equal, as a set, to the elements the data used.

With ``fix_identity=False`` nothing anchors the kernel: ``(R_j, θ)`` and ``(R_j S, θ')`` with ``S θ' = θ``
fit equally well for any invertible ``S`` that keeps the ``R_j S`` doubly stochastic (a permutation, or a
softening that ``θ'`` compensates by spreading its values), and training indeed ends with soft stacks. What
the data determine is the stack relative to its first element, so that is what is decomposed then:
``R_j R_0⁺`` (``⁺``: pseudo-inverse). It is exactly ``P_{t_j}`` when the fit is exact and ``R_0`` is
invertible, but loses accuracy when ``R_0`` is ill-conditioned; the identity-fixed layer is the supported
setting for recovery.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from symkernels import analysis, functional, groups
from symkernels._checks import check_int
from symkernels.nn import DoublyStochasticStack

__all__ = [
    "PROBLEMS",
    "ToyLayer",
    "ToyProblem",
    "ToyResult",
    "make_problem",
    "run_toy",
]

PROBLEMS = ("shift1d", "rot2d", "cube")

# Default grid size and number of training steps per problem: sized so that each run takes a few seconds on
# two CPU cores and recovers the group over many seeds (the cube's 24 stacked 27 x 27 matrices converge
# slowest).
_DEFAULT_SIZE = {"shift1d": 8, "rot2d": 5, "cube": 3}
_MIN_SIZE = {"shift1d": 4, "rot2d": 2, "cube": 2}
_DEFAULT_STEPS = {"shift1d": 400, "rot2d": 400, "cube": 800}


@dataclass(frozen=True)
class ToyProblem:
    """A toy problem: the exact group acting on ``d`` positions and the elements the data use."""

    name: str
    partial: bool
    size: int
    basis: torch.Tensor  # [|G|, d, d] exact permutations of the whole group
    element_names: list[str]  # names of the basis elements
    # Basis indices of the elements the data use, identity first; stack element j is trained on target[j].
    target: list[int]

    @property
    def dim(self) -> int:
        return self.basis.shape[-1]


@dataclass
class ToyResult:
    """What :func:`run_toy` learned and whether it recovered the target elements."""

    problem: str
    partial: bool
    element_names: list[str]  # the exact group elements the stack is decomposed onto
    target: list[str]  # the elements the data used; stack element j was trained on copies moved by target[j]
    coefficients: torch.Tensor  # float64 [len(target), len(element_names)]: convex weights per stack element
    assigned: list[str]  # per stack element, the group element with the largest coefficient
    mass: list[float]  # per stack element, that largest coefficient
    threshold: float
    recovered: bool
    seconds: float  # training and decomposition (not the one-off imports)
    matches_labels: bool = False  # assigned == target in order (each element found the transform it was fed)
    residuals: list[float] = field(default_factory=list)  # ||Σ c_k P_k − R_j||_F per stack element
    loss: float = math.nan  # final training loss (mean over samples of the squared error)
    steps: int = 0
    seed: int = 0
    size: int = 0
    noise: float = 0.0
    fix_identity: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the coefficients as nested lists)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["coefficients"] = self.coefficients.tolist()
        return out


class ToyLayer(nn.Module):
    """A learned stack of ``group_size`` soft permutations and one canonical kernel ``[channels, dim]``.

    ``forward()`` returns the expanded kernel ``[group_size, channels, dim]``: copy ``j`` is ``R_j θ``.
    """

    def __init__(
        self,
        group_size: int,
        dim: int,
        channels: int,
        *,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.reps = DoublyStochasticStack(group_size, dim, n_iter, tau, fix_identity, generator=generator)
        self.kernel = nn.Parameter(torch.zeros(1, channels, dim))

    def forward(self) -> torch.Tensor:
        stack = self.reps()
        # kernel_size=1 treats the d positions as a flat axis; the expansion K[g, c] = R_g θ[c] is the same.
        expanded = functional.expand_kernel(stack, self.kernel, 1)
        return expanded.reshape(stack.shape[0], self.kernel.shape[1], self.kernel.shape[2])


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_problem(problem: object) -> str:
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, one of {PROBLEMS}, got {type(problem).__name__}")
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
    return problem


def _index_of(basis: torch.Tensor, matrix: torch.Tensor) -> int:
    matches = (basis == matrix).flatten(1).all(dim=1).nonzero()
    if matches.numel() != 1:
        raise RuntimeError("a product of group elements was not found exactly once in the group")
    return int(matches[0])


def make_problem(problem: str, *, partial: bool = False, size: int | None = None) -> ToyProblem:
    """The group, its element names and the target elements of a toy problem (see the module docstring).

    ``size``: the signal length (``shift1d``, >= 4), grid side (``rot2d``, >= 2) or cube side (``cube``,
    >= 2); ``None`` takes the default (8, 5, 3).
    """
    problem = _check_problem(problem)
    if not isinstance(partial, bool):
        raise TypeError(f"partial must be a bool, got {type(partial).__name__}")
    size = _DEFAULT_SIZE[problem] if size is None else check_int("size", size, _MIN_SIZE[problem])
    if problem == "shift1d":
        basis, names = groups.cyclic_shifts(size), groups.shift_names(size)
        target = list(range(size // 2 if partial else size))
    elif problem == "rot2d":
        basis, names = groups.rotation_permutations(size), groups.rotation_names()
        target = [0, 1] if partial else [0, 1, 2, 3]
    else:
        basis, names = groups.cube_rotations(size), groups.cube_rotation_names()
        if partial:
            z, x = basis[names.index("z:90")], basis[names.index("x:90")]
            target = [
                _index_of(basis, torch.linalg.matrix_power(z, a) @ torch.linalg.matrix_power(x, b))
                for a in range(4)
                for b in range(4)
            ]
        else:
            target = list(range(len(names)))
    return ToyProblem(problem, partial, size, basis, names, target)


def _make_data(
    problem: ToyProblem, channels: int, samples: int, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """Noisy transformed copies ``[len(target), samples, channels, d]``; dim 0 indexes the label."""
    canonical = torch.randn(channels, problem.dim, generator=generator)
    moved = torch.einsum("gnm,cm->gcn", problem.basis[problem.target], canonical)
    eps = torch.randn(len(problem.target), samples, channels, problem.dim, generator=generator)
    return moved.unsqueeze(1) + noise * eps


def _loss(layer: ToyLayer, data: torch.Tensor) -> torch.Tensor:
    """Squared error of each sample against the copy of its label, summed over channels and positions."""
    return (layer().unsqueeze(1) - data).square().sum(dim=(-2, -1)).mean()


def _train(
    layer: ToyLayer,
    data: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    warmup: int,
    lr: float,
) -> None:
    """Full-batch steps; the logits join the optimizer (learning rate ``lr``) after ``warmup`` steps."""
    for step in range(steps):
        if step == warmup:
            optimizer.add_param_group({"params": list(layer.reps.parameters()), "lr": lr})
        loss = _loss(layer, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _decompose(stack: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``[N, K]`` and residuals ``[N]`` of the stack over the exact group."""
    coefficients = analysis.decompose(stack, basis)
    return coefficients, analysis.decomposition_residual(stack, basis, coefficients)


def _relative_stack(stack: torch.Tensor) -> torch.Tensor:
    """``R_j R_0⁺``: the stack relative to its first element (the part a free-identity fit determines)."""
    return stack @ torch.linalg.pinv(stack[0])


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (``None``: unchanged), restoring the setting afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_toy(
    problem: str,
    *,
    partial: bool = False,
    seed: int = 0,
    steps: int | None = None,
    noise: float = 0.1,
    threshold: float = 0.8,
    size: int | None = None,
    channels: int = 8,
    samples: int = 8,
    lr: float = 0.1,
    kernel_lr: float = 0.05,
    warmup: int = 100,
    n_iter: int = 20,
    tau: float = 1.0,
    fix_identity: bool = True,
    threads: int | None = 1,
) -> ToyResult:
    """Train one weight-sharing layer on a toy problem and report its decomposition (module docstring).

    ``problem``: ``"shift1d"``, ``"rot2d"`` or ``"cube"``; ``partial``: use only the partial subset;
    ``steps``: full-batch Adam steps (``None``: 400, 400, 800; ``0`` reports the untrained stack);
    ``noise``: standard deviation of the additive noise (the signals have unit variance); ``threshold``: the
    mass, in ``(0, 1]``, each element must put on one group element; ``size``: see :func:`make_problem`;
    ``channels``: canonical signals per sample; ``samples``: noisy copies per target element; ``lr`` /
    ``kernel_lr``: Adam learning rates of the logits and of the kernel; ``warmup``: steps, counted in
    ``steps``, before the logits start training (the kernel trains from the first); ``n_iter`` / ``tau``:
    Sinkhorn iterations and temperature; ``fix_identity``: first stack element fixed to the identity (the
    default; see the module docstring for what a learned identity can and cannot recover); ``threads``: torch
    CPU threads during the run, restored afterwards (``None``: leave the setting alone). One thread is the
    default because the tensors are tiny: splitting them costs more than it saves, and on a busy machine
    several threads can make the run ten times slower.

    Runs on the CPU, on whichever backend :mod:`symkernels.backends` picks (the native one when built).
    Deterministic for a given seed; the global random state is left alone.
    """
    spec = make_problem(problem, partial=partial, size=size)
    seed = check_int("seed", seed, 0)
    steps = _DEFAULT_STEPS[spec.name] if steps is None else check_int("steps", steps, 0)
    noise = _check_real("noise", noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    threshold = _check_real("threshold", threshold)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    channels = check_int("channels", channels, 1)
    samples = check_int("samples", samples, 1)
    warmup = check_int("warmup", warmup, 0)
    for name, rate in (("lr", lr), ("kernel_lr", kernel_lr)):
        if _check_real(name, rate) <= 0:
            raise ValueError(f"{name} must be > 0, got {rate}")
    if not isinstance(fix_identity, bool):
        raise TypeError(f"fix_identity must be a bool, got {type(fix_identity).__name__}")
    if threads is not None:
        threads = check_int("threads", threads, 1)

    with _torch_threads(threads):
        generator = torch.Generator().manual_seed(seed)
        data = _make_data(spec, channels, samples, noise, generator)
        layer = ToyLayer(
            len(spec.target),
            spec.dim,
            channels,
            n_iter=n_iter,
            tau=tau,
            fix_identity=fix_identity,
            generator=generator,
        )
        # Built before the clock starts: the first Adam imports torch._dynamo (seconds, once per process).
        optimizer = torch.optim.Adam([layer.kernel], lr=kernel_lr)
        start = time.perf_counter()
        _train(layer, data, optimizer, steps=steps, warmup=warmup, lr=lr)
        with torch.no_grad():
            loss = _loss(layer, data).item()
            stack = layer.reps().to(torch.float64)
        if not fix_identity:
            stack = _relative_stack(stack)
        coefficients, residuals = _decompose(stack, spec.basis.to(torch.float64))
    mass, best = coefficients.max(dim=1)
    assigned = [spec.element_names[i] for i in best.tolist()]
    target = [spec.element_names[i] for i in spec.target]
    sharp = bool((mass >= threshold).all())
    return ToyResult(
        problem=spec.name,
        partial=spec.partial,
        element_names=list(spec.element_names),
        target=target,
        coefficients=coefficients,
        assigned=assigned,
        mass=mass.tolist(),
        threshold=threshold,
        recovered=sharp and len(set(assigned)) == len(assigned) and set(assigned) == set(target),
        seconds=time.perf_counter() - start,
        matches_labels=sharp and assigned == target,
        residuals=residuals.tolist(),
        loss=loss,
        steps=steps,
        seed=seed,
        size=spec.size,
        noise=noise,
        fix_identity=fix_identity,
    )
