"""Weight-sharing convolutions: one canonical kernel permuted by a stack of (soft) permutations."""

from __future__ import annotations

import math

import torch
from torch import nn

from symkernels import functional
from symkernels._checks import check_positive_int
from symkernels.nn.stacks import DoublyStochasticStack, FixedStack
from symkernels.reference.regularizers import entropy_regularizer, norm_regularizer


class _WeightSharingConv2d(nn.Module):
    """Shared machinery: ``weight [C_out, C_in, G_in·k²]``, ``bias [C_out, 1, 1, 1]``, stack ``reps``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group_size: int,
        in_group_size: int,
        *,
        stride: int,
        padding: int | tuple[int, int] | str,
        bias: bool,
        n_iter: int,
        tau: float,
        fix_identity: bool,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.group_size = check_positive_int(group_size, "group_size")
        self.in_group_size = check_positive_int(in_group_size, "in_group_size")
        self.stride = stride
        self.padding = padding
        dim = in_group_size * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, dim))
        self.bias = nn.Parameter(torch.zeros(out_channels, 1, 1, 1)) if bias else None
        self.reps: DoublyStochasticStack | FixedStack = DoublyStochasticStack(
            group_size, dim, n_iter=n_iter, tau=tau, fix_identity=fix_identity
        )

    def representations(self) -> torch.Tensor:
        """The ``[G, d, d]`` stack applied to the kernel."""
        return self.reps()

    def kernel(self) -> torch.Tensor:
        """The conv-ready kernel ``[C_out·G, C_in·G_in, k, k]``."""
        return functional.expand_kernel(
            self.reps.learned(), self.weight, self.kernel_size, leading_identity=self.reps.fix_identity
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.permuted_conv2d(
            x,
            self.reps.learned(),
            self.weight,
            self.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            leading_identity=self.reps.fix_identity,
        )

    def regularizers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm, entropy)`` of docs/design.md §6; both zero for a fixed stack. The entropy of the whole
        stack is that of its learned matrices: a fixed identity adds none."""
        logits = getattr(self.reps, "logits", None)
        norm = self.weight.new_zeros(()) if logits is None else norm_regularizer(logits)
        return norm, entropy_regularizer(self.reps.learned())

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"group_size={self.group_size}, in_group_size={self.in_group_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )


class WSLiftConv2d(_WeightSharingConv2d):
    """Lifting layer ``[B, C_in, H, W] → [B, C_out, G, H', W']`` with learned ``k² × k²`` representations."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group_size: int = 4,
        *,
        stride: int = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            group_size,
            1,
            stride=stride,
            padding=padding,
            bias=bias,
            n_iter=n_iter,
            tau=tau,
            fix_identity=fix_identity,
        )
        nn.init.kaiming_normal_(self.weight, a=math.sqrt(5))


class WSConv2d(_WeightSharingConv2d):
    """Group-conv layer ``[B, C_in, G_in, H, W] → [B, C_out, G, H', W']``; the stack acts jointly on the
    input group axis and space (``d = G_in·k²``, no Kronecker factorisation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group_size: int = 4,
        *,
        in_group_size: int | None = None,
        stride: int = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        n_iter: int = 20,
        tau: float = 1.0,
        fix_identity: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            group_size,
            group_size if in_group_size is None else in_group_size,
            stride=stride,
            padding=padding,
            bias=bias,
            n_iter=n_iter,
            tau=tau,
            fix_identity=fix_identity,
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
