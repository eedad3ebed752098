"""The Laplace / KFAC marginal likelihood of a model's prior precisions, through laplace-torch and curvlinops.

Prior ``p(θ) = Π_l N(θ_l | 0, δ_l⁻¹ I)``, one ``δ_l`` per parameter tensor. At the current (MAP) parameters,
:func:`fit_curvature` computes a Kronecker-factored GGN ``H_l ≈ B_l ⊗ A_l`` (exact Fisher for softmax) over
the training set and eigendecomposes each factor once; then

    log p(D|δ) ≈ log p(D|θ*) − ½ Σ_l δ_l ||θ*_l||² − ½ Σ_l [Σ_ij log(μ_i λ_j + δ_l) − P_l log δ_l]

is a cheap differentiable function of δ (:meth:`Curvature.log_marginal_likelihood`), and the effective
dimension of a tensor is ``γ_l = Σ_ij μ_i λ_j / (μ_i λ_j + δ_l)``.

laplace-torch, curvlinops and their pinned dependencies are the optional extra ``symkernels[layerwise]``;
nothing here imports them before a curvature is fitted.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from symkernels.layerwise.paths import curvature_form

INSTALL_HINT = (
    "pip install 'symkernels[layerwise]' "
    "(laplace-torch==0.3, curvlinops-for-pytorch==3.0.1, asdfghjkl==0.1a4)"
)
CURVATURE_MODULES = (nn.Linear, nn.Conv2d)
# "exact": the GGN (exact Fisher for softmax), one backward pass per class; "mc": one label sampled from
# the model per image, one backward pass (an unbiased estimate of the same factors, for quick runs).
FISHERS = ("exact", "mc")


def require_laplace() -> tuple[Any, type]:
    """``(laplace.Laplace, CurvlinopsGGN)``; a clear error naming the extra when they are missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script deprecation inside laplace
            from laplace import Laplace
            from laplace.curvature import CurvlinopsGGN
    except ImportError as error:
        raise RuntimeError(
            f"the marginal likelihood needs laplace-torch and curvlinops ({error}); install them with "
            f"{INSTALL_HINT}"
        ) from error
    return Laplace, CurvlinopsGGN


def prior_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, tensor)`` of every parameter with a prior: those of the ``nn.Linear``/``nn.Conv2d`` modules,
    in ``model.parameters()`` order (the order of laplace's factors). Other parameters (e.g. learned stacks)
    are fitted by the data term alone."""
    owned = {
        id(p)
        for module in model.modules()
        if isinstance(module, CURVATURE_MODULES)
        for p in module.parameters(recurse=False)
    }
    return [(name, p) for name, p in model.named_parameters() if id(p) in owned]


def check_curvature_model(model: nn.Module) -> None:
    """Refuse models whose curvature the libraries would get wrong without a word.

    A ``nn.Conv2d`` that pads (the libraries read ``padding`` but ignore ``padding_mode``, so a circular
    convolution would get zero-padded patches in its input factor) or has groups.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
            if module.padding == "same" or any(padding):
                raise ValueError(
                    f"{name or 'model'} is a Conv2d with padding={module.padding!r} "
                    f"(padding_mode={module.padding_mode!r}): the curvature libraries ignore "
                    "padding_mode, so "
                    "pad the input explicitly (F.pad(x, ..., mode='circular')) and use padding=0"
                )
            if module.groups != 1:
                raise ValueError(f"{name} is a grouped Conv2d (groups={module.groups}); use groups=1")


@contextlib.contextmanager
def _only_priors_require_grad(model: nn.Module, with_prior: set[int]) -> Iterator[None]:
    """laplace takes the parameters that require grad: hide the others while the curvature is fitted."""
    hidden = [p for p in model.parameters() if p.requires_grad and id(p) not in with_prior]
    for p in hidden:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in hidden:
            p.requires_grad_(True)


@dataclass
class Curvature:
    """A fitted Laplace approximation: per tensor, the factors' eigenvalues; the MAP terms; functions of δ."""

    laplace: Any  # laplace.KronLaplace, fitted
    names: list[str]  # parameter tensors, in the order of δ
    sizes: list[int]  # P_l
    n_data: int

    def log_marginal_likelihood(self, delta: torch.Tensor) -> torch.Tensor:
        """``log p(D|δ)`` (differentiable in ``delta``, one entry per tensor)."""
        self._check(delta)
        return self.laplace.log_marginal_likelihood(prior_precision=delta)

    def effective_dimensions(self, delta: torch.Tensor) -> torch.Tensor:
        """``γ_l = Σ_ij μ_i λ_j / (μ_i λ_j + δ_l)`` per tensor (a Kronecker factor pair, or one factor)."""
        self._check(delta)
        values = []
        for curvature, d in zip(self.eigenvalues(), delta.detach(), strict=True):
            curvature = curvature.clamp_min(0)  # roundoff can leave tiny negative eigenvalues
            values.append((curvature / (curvature + d)).sum())
        return torch.stack(values)

    def eigenvalues(self) -> list[torch.Tensor]:
        """Per tensor, the eigenvalues of ``H_l`` (the products ``μ_i λ_j`` for a Kronecker pair)."""
        out = []
        for eigenvalues in self.laplace.H.eigenvalues:
            values = eigenvalues[0]
            if len(eigenvalues) == 2:
                values = torch.outer(values, eigenvalues[1]).flatten()
            out.append(values)
        return out

    def _check(self, delta: torch.Tensor) -> None:
        if delta.shape != (len(self.names),):
            raise ValueError(
                f"delta must have shape [{len(self.names)}] (one per tensor), got {tuple(delta.shape)}"
            )


def fit_curvature(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    fisher: str = "exact",
) -> Curvature:
    """Fit the KFAC Laplace approximation of ``model`` at its current parameters over ``(images, labels)``.

    ``fisher`` is one of :data:`FISHERS`. The model is read in its curvature form
    (:func:`~symkernels.layerwise.paths.curvature_form`); its
    training mode and ``requires_grad`` flags are restored afterwards.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {list(FISHERS)}, got {fisher!r}")
    Laplace, CurvlinopsGGN = require_laplace()
    check_curvature_model(model)
    named = prior_parameters(model)
    if not named:
        raise ValueError("the model has no nn.Linear or nn.Conv2d parameters to put a prior on")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"images and labels must be non-empty and of one length, got {len(images)} and {len(labels)}"
        )
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    was_training = model.training
    try:
        with curvature_form(model), _only_priors_require_grad(model, {id(p) for _, p in named}):
            laplace = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure="kron",
                backend=CurvlinopsGGN,
                backend_kwargs={"stochastic": fisher == "mc"},
                prior_precision=1.0,
            )
            if laplace.n_layers != len(named):
                raise RuntimeError(f"laplace sees {laplace.n_layers} tensors, expected {len(named)}")
            laplace.fit(loader)
    finally:
        model.train(was_training)
    return Curvature(laplace, [n for n, _ in named], [p.numel() for _, p in named], len(images))
