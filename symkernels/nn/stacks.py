"""Representation stacks: learned (Sinkhorn of logits) or fixed (exact permutations)."""

from __future__ import annotations

import torch
from torch import nn

from symkernels import functional
from symkernels._checks import check_floating, check_positive_int, check_square_stack, check_tau, check_tensor


class DoublyStochasticStack(nn.Module):
    """``group_size`` learned soft permutations of size ``dim × dim`` (docs/design.md §3).

    With ``fix_identity`` the first element is the exact identity (a buffer) and only ``group_size − 1``
    logit matrices are learned. ``forward()`` returns the ``[group_size, dim, dim]`` stack. The logits start
    as ``U[0, 1)`` draws from ``generator`` (the global generator when None). ``check_finite=True`` makes
    every Sinkhorn of the logits raise on NaN/Inf (:func:`symkernels.sinkhorn`'s option: a host sync per
    call on a GPU); by default non-finite logits give NaN matrices, read nowhere.
    """

    # Set while symkernels.nn.precompute_representations is active: the learned matrices, computed with the
    # other stacks of the model.
    _precomputed: torch.Tensor | None = None

    def __init__(
        self,
        group_size: int,
        dim: int,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
        *,
        check_finite: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.group_size = check_positive_int(group_size, "group_size")
        self.dim = check_positive_int(dim, "dim")
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.tau = check_tau(tau)
        self.fix_identity = bool(fix_identity)
        self.check_finite = bool(check_finite)
        learned = group_size - 1 if fix_identity else group_size
        self.logits = nn.Parameter(torch.rand(learned, dim, dim, generator=generator))
        # An attribute of the instance from the start: torch.compile guards on the instance's attributes, and
        # one that appeared after the first call would recompile the model.
        self._precomputed = None

    def forward(self) -> torch.Tensor:
        """The whole stack ``[group_size, dim, dim]`` (the identity first when fixed)."""
        learned = self.learned()
        return functional.prepend_identity(learned) if self.fix_identity else learned

    def learned(self) -> torch.Tensor:
        """The learned matrices only, ``Sinkhorn(logits)``: ``[group_size − 1, dim, dim]`` with a fixed
        identity (the layers expand them with the identity in the kernel instead of concatenating it)."""
        if self._precomputed is not None:
            return self._precomputed
        return functional.sinkhorn(self.logits, self.n_iter, self.tau, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}, dim={self.dim}, n_iter={self.n_iter}, tau={self.tau}, "
            f"fix_identity={self.fix_identity}"
        )


class FixedStack(nn.Module):
    """A fixed ``[G, d, d]`` stack (e.g. exact permutations: a G-CNN layer); no parameters."""

    def __init__(self, matrices: torch.Tensor) -> None:
        super().__init__()
        matrices = check_tensor(matrices, "matrices")
        check_floating(matrices, "matrices")
        if matrices.dim() != 3:
            raise ValueError(f"matrices must have shape [G, d, d], got {tuple(matrices.shape)}")
        check_square_stack(matrices, "matrices")
        self.group_size, self.dim = matrices.shape[0], matrices.shape[-1]
        self.register_buffer("matrices", matrices.detach().clone())

    fix_identity = False

    def forward(self) -> torch.Tensor:
        return self.matrices

    def learned(self) -> torch.Tensor:
        """All of the stack (nothing is implicit)."""
        return self.matrices

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"
