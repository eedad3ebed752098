"""``WSLiftConv2d`` and ``WSConv2d`` with the published modules' constructors, parameters and methods.

Parameters, in the published order (the order of ``parameters()``, so optimizer state lines up too):
``weight [C_out, C_in, G_in·k²]``, ``bias [C_out, 1, 1, 1]`` (absent with ``bias=False``), ``id [1, d, d]``
(only with ``fix_identity``: the identity plus 1e-16, frozen) and ``representations [G', d, d]`` (the logits;
``G' = G − 1`` with ``fix_identity``), ``d = G_in·k²``. Checkpoints of the published modules load unchanged,
and these load into them.

Computed by symkernels' ops: the Sinkhorn through the fused op with the published stopping rule
(:mod:`symkernels.compat.sinkhorn`), the kernel expansion and convolution through
:func:`symkernels.permuted_conv2d` (the fixed identity enters as the exact identity: the published
``id`` differs from it by 1e-16 off the diagonal).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from symkernels._checks import check_positive_int
from symkernels.compat.arguments import (
    check_flag,
    check_init_mode,
    check_padding,
    check_tolerance,
    resolve_device,
)
from symkernels.compat.sinkhorn import published_sinkhorn
from symkernels.functional import expand_kernel, permuted_conv2d
from symkernels.reference.regularizers import entropy_regularizer, norm_regularizer
from symkernels.reference.sinkhorn import AUTHORS_TOLERANCE

__all__ = ["IDENTITY_OFFSET", "WSConv2d", "WSLiftConv2d"]

# The published modules store the fixed identity as eye + 1e-16; kept, so that checkpoints and the entropy
# regulariser are the same.
IDENTITY_OFFSET = 1e-16


class _PublishedWeightSharing(nn.Module):
    """What both layers share: the parameters, the Sinkhorn, the regularisers, the expanded kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        in_group_size: int,
        group_size: int,
        n_iter: int,
        device: object,
        bias: bool,
        init_mode: str,
        padding: int | tuple[int, int] | str,
        fix_identity: bool,
        tol: float | None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.n_iter = check_positive_int(n_iter, "n_iter")
        self.init_mode = check_init_mode(init_mode)
        self.padding = check_padding(padding)
        self.fix_identity = check_flag(fix_identity, "fix_identity")
        self.tol = check_tolerance(tol)
        has_bias = check_flag(bias, "bias")
        device = resolve_device(device)
        dim = in_group_size * self.kernel_size**2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, dim, device=device))
        self.bias = nn.Parameter(torch.zeros(out_channels, 1, 1, 1, device=device)) if has_bias else None
        learned = group_size - 1 if self.fix_identity else group_size
        if self.fix_identity:
            identity = torch.eye(dim, device=device).unsqueeze(0) + IDENTITY_OFFSET
            self.id = nn.Parameter(identity, requires_grad=False)
        # Drawn before the weight, as published: the same seed gives the same initial parameters.
        if self.init_mode == "rand":
            self.representations = nn.Parameter(torch.rand(learned, dim, dim, device=device))
        else:
            self.representations = nn.Parameter(torch.empty(learned, dim, dim, device=device))
            nn.init.kaiming_uniform_(self.representations)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def learned_representations(self) -> torch.Tensor:
        """``Sinkhorn(representations)``, ``[G', d, d]``: the published loop (``tol``), or exactly ``n_iter``
        iterations with ``tol=None``."""
        return published_sinkhorn(self.representations, self.n_iter, self.tol)

    def get_representations(self) -> torch.Tensor:
        """The whole stack ``[G, d, d]``, the stored ``id`` first with ``fix_identity``."""
        learned = self.learned_representations()
        return torch.cat((self.id, learned), dim=0) if self.fix_identity else learned

    def get_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)``: the norm regulariser of the logits, the entropy of the whole stack."""
        return norm_regularizer(self.representations), entropy_regularizer(self.get_representations())

    def get_W(self) -> torch.Tensor:
        """The expanded convolution kernel ``[C_out·G, C_in·G_in, k, k]``."""
        return expand_kernel(
            self.learned_representations(), self.weight, self.kernel_size, leading_identity=self.fix_identity
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # `input`: the published argument name
        return permuted_conv2d(
            input,
            self.learned_representations(),
            self.weight,
            self.bias,
            kernel_size=self.kernel_size,
            padding=self.padding,
            leading_identity=self.fix_identity,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, n_iter={self.n_iter}, "
            f"padding={self.padding!r}, bias={self.bias is not None}, fix_identity={self.fix_identity}, "
            f"tol={self.tol}"
        )


class WSLiftConv2d(_PublishedWeightSharing):
    """Lifting layer ``[B, C_in, H, W] → [B, C_out, group_size, H', W']`` (the published signature).

    ``tol`` (keyword only, not in the published signature): the Sinkhorn's stopping tolerance, the published
    rule by default; ``None`` runs exactly ``n_iter`` iterations (as :class:`symkernels.nn.WSLiftConv2d`).
    ``device="cuda"`` without CUDA falls back to the CPU with a warning.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group_size: int,
        n_iter: int,
        device: str | torch.device | None = "cuda",
        bias: bool = True,
        init_mode: str = "rand",
        padding: int | tuple[int, int] | str = 0,
        fix_identity: bool = False,
        *,
        tol: float | None = AUTHORS_TOLERANCE,
    ) -> None:
        group_size = check_positive_int(group_size, "group_size")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            1,
            group_size,
            n_iter,
            device,
            bias,
            init_mode,
            padding,
            fix_identity,
            tol,
        )
        self.group_size = group_size

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class WSConv2d(_PublishedWeightSharing):
    """Group-conv layer ``[B, C_in, g_in, H, W] → [B, C_out, g_out, H', W']`` (the published signature);
    ``tol`` and ``device`` as for :class:`WSLiftConv2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        g_in: int,
        g_out: int,
        n_iter: int,
        device: str | torch.device | None = "cuda",
        bias: bool = True,
        init_mode: str = "rand",
        padding: int | tuple[int, int] | str = 0,
        fix_identity: bool = False,
        *,
        tol: float | None = AUTHORS_TOLERANCE,
    ) -> None:
        g_in = check_positive_int(g_in, "g_in")
        g_out = check_positive_int(g_out, "g_out")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            g_in,
            g_out,
            n_iter,
            device,
            bias,
            init_mode,
            padding,
            fix_identity,
            tol,
        )
        self.g_in, self.g_out, self.D = g_in, g_out, self.kernel_size**2

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
