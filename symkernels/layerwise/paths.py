"""Relaxed layers: several parameterisations ("paths") of one map, averaged, each with its own prior.

Every path maps ``[B, C, H, W]`` to ``[B, C', H/s, W/s]`` and keeps all its parameters in ``nn.Linear`` and
``nn.Conv2d`` modules, because the Kronecker-factored curvature libraries only know those two: a structured
path applies its fixed structure to the input (a projection, a block-diagonal layout, the patches of every
lifted copy) and learns an ordinary linear map on the result, so the library's factors of that map are the
path's factors.

Convolutions pad circularly with an explicit ``F.pad`` and run with ``padding=0``: the curvature libraries
ignore ``padding_mode="circular"`` and would compute the input factor of zero-padded patches.

Some paths have a second, faster form for training (an ordinary convolution of the group copies, two
einsums): :func:`curvature_form` switches them to the Linear/Conv2d form while the curvature is computed.
Both forms compute the same function.

Strided paths are strided convolutions: the stride-1 output at the positions ``(0, 0), (0, s), ...``, so a
circular shift by a multiple of the stride shifts the output. (The paper keeps, instead, the polyphase
component holding the batch maximum; that makes an image's output depend on the other images of its batch,
and its per-sample variant trained markedly slower here: 46 % against 84 % test accuracy after 6 epochs of
a CONV backbone on 1,000 upright 16×16 digits.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from symkernels._checks import check_int
from symkernels.layerwise.interpolation import anchor_count, grid_points, random_anchors, rbf_interpolation

PATHS = ("fc", "conv", "ffc", "sconv", "sfc", "gconv")
SPARSE_CONV_FRACTION = 0.8  # S-CONV keeps round(0.8·k²) anchors (7 of 9 for k = 3)
SPARSE_FC_FRACTION = 0.5  # S-FC keeps round(0.5·X) anchors per spatial factor


def circular_pad(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Pad ``[B, C, H, W]`` circularly so that a ``kernel_size`` convolution keeps ``H × W``."""
    left = (kernel_size - 1) // 2
    return F.pad(x, (left, kernel_size - 1 - left, left, kernel_size - 1 - left), mode="circular")


def circular_patches(x: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """im2col of the circularly padded input: ``[B, C, k², H'·W']`` (patch entries row-major)."""
    batch, channels = x.shape[:2]
    columns = F.unfold(circular_pad(x, kernel_size), kernel_size, stride=stride)
    return columns.reshape(batch, channels, kernel_size * kernel_size, -1)


def block_diagonal_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, R, D] → [B, R, R·D]``: row ``r`` holds ``x[:, r]`` in its ``r``-th block and zeros elsewhere."""
    batch, rows, dim = x.shape
    return torch.diag_embed(x.transpose(1, 2)).permute(0, 2, 3, 1).reshape(batch, rows, rows * dim)


def _normal_init(module: nn.Linear | nn.Conv2d, fan_in: int, gain: float) -> None:
    """Weights ``N(0, gain²/fan_in)`` with the true fan-in (block-diagonal inputs hide it), zero biases."""
    nn.init.normal_(module.weight, std=gain / math.sqrt(fan_in))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class TwoFormModule(nn.Module):
    """A module with a fast training form and a form the curvature libraries read (:func:`curvature_form`)."""

    in_curvature_form: bool = False


@contextlib.contextmanager
def curvature_form(model: nn.Module) -> Iterator[None]:
    """Run every :class:`TwoFormModule` of ``model`` in its Linear/Conv2d form inside the block."""
    switched = [m for m in model.modules() if isinstance(m, TwoFormModule)]
    for module in switched:
        module.in_curvature_form = True
    try:
        yield
    finally:
        for module in switched:
            module.in_curvature_form = False


class _Path(nn.Module):
    """Shapes every path checks: ``[B, in_channels, size, size] → [B, out_channels, size/s, size/s]``.

    :meth:`reset_parameters` draws the weights so that the output's second moment is ``gain²`` times the
    input's (He initialisation for ``gain = √2``); biases start at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.size = check_int("size", size)
        self.stride = check_int("stride", stride)
        if size % stride:
            raise ValueError(f"size {size} is not divisible by stride {stride}")
        self.out_size = size // stride

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.size, self.size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects input [B, {expected}], got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, size={self.size}, stride={self.stride}, "
            f"parameters={sum(p.numel() for p in self.parameters())}"
        )


class DensePath(_Path):
    """FC: a dense map of the flattened image, ``C·X → C'·X'``."""

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, size, stride)
        self.linear = nn.Linear(in_channels * size * size, out_channels * self.out_size**2)
        self.reset_parameters()

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        _normal_init(self.linear, self.linear.in_features, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = self.linear(x.flatten(1))
        return y.reshape(len(x), self.out_channels, self.out_size, self.out_size)


class ConvPath(_Path):
    """CONV: a circular ``k × k`` convolution."""

    def __init__(
        self, in_channels: int, out_channels: int, size: int, stride: int = 1, kernel_size: int = 3
    ) -> None:
        super().__init__(in_channels, out_channels, size, stride)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.reset_parameters()

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        _normal_init(self.conv, self.in_channels * self.kernel_size**2, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.conv(circular_pad(x, self.kernel_size))


class SparseConvPath(_Path):
    """S-CONV: each filter is ``M`` anchor values interpolated to the ``k × k`` grid, ``W[c', c] = u Ψ``.

    The input is projected once onto the anchors (a fixed grouped convolution with the rows of Ψ as kernels),
    then a learned 1×1 convolution ``C·M → C'`` applies ``u``; its input factor is ``(I⊗Ψ) A_W (I⊗Ψ)ᵀ``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        stride: int = 1,
        kernel_size: int = 3,
        *,
        anchors: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, size, stride)
        self.kernel_size = k = check_int("kernel_size", kernel_size)
        count = (
            anchor_count(SPARSE_CONV_FRACTION, k * k) if anchors is None else check_int("anchors", anchors)
        )
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        psi = rbf_interpolation(random_anchors(count, k, k, generator), grid_points(k, k))  # [M, k²]
        self.register_buffer("psi", psi.float().contiguous())
        self.anchors = count
        self.conv = nn.Conv2d(in_channels * count, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        # The filter u Ψ of u ~ N(0, s²) has entries of variance s²·||Ψ[:, n]||²: scale to the dense fan-in.
        spread = self.psi.square().sum(dim=0).mean().item()
        _normal_init(self.conv, round(self.in_channels * self.kernel_size**2 * spread), gain)

    def projection_kernel(self) -> torch.Tensor:
        """``[C·M, 1, k, k]``: projection channel ``(c, m)`` reads input channel ``c`` with ``Ψ[m]``."""
        k = self.kernel_size
        return (
            self.psi.reshape(1, self.anchors, k, k).expand(self.in_channels, -1, -1, -1).reshape(-1, 1, k, k)
        )

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``[C', C, k, k]`` convolution kernel ``u Ψ``."""
        u = self.conv.weight.reshape(self.out_channels, self.in_channels, self.anchors)
        return (u @ self.psi).reshape(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        kernel = self.projection_kernel().to(x)
        projected = F.conv2d(
            circular_pad(x, self.kernel_size), kernel, stride=self.stride, groups=self.in_channels
        )
        return self.conv(projected)


class FactoredDensePath(_Path, TwoFormModule):
    """F-FC: a rank-1 spatial map per channel pair, ``W[c', x', c, x] = V[x', c', c] · U[c', c, x]``.

    ``z[b, c, c'] = Σ_x U[c', c, x] x[b, c, x] + bU[c']`` and ``y[b, c', x'] = Σ_c V[x', c', c] z[b, c, c'] +
    bV[x']``. Each stage is a ``nn.Linear`` on block-diagonal rows (row ``c`` carries channel ``c`` in block
    ``c``), so the library's input factor is block-diagonal per channel. Parameters
    ``C'·C·(X + X') + C' + X'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        stride: int = 1,
        *,
        in_anchors: int | None = None,
        out_anchors: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, size, stride)
        pixels_in, pixels_out = size * size, self.out_size**2
        # Sparsified (S-FC) when anchors are given: U and V are read through fixed projections Ψ_in, Ψ_out.
        self.in_dim, self.out_dim = pixels_in, pixels_out
        if (in_anchors is None) != (out_anchors is None):
            raise ValueError("give both in_anchors and out_anchors (S-FC) or neither (F-FC)")
        if in_anchors is not None and out_anchors is not None:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            self.in_dim, self.out_dim = (
                check_int("in_anchors", in_anchors),
                check_int("out_anchors", out_anchors),
            )
            grid_in, grid_out = grid_points(size, size), grid_points(self.out_size, self.out_size)
            psi_in = rbf_interpolation(random_anchors(self.in_dim, size, size, generator), grid_in)
            psi_out = rbf_interpolation(
                random_anchors(self.out_dim, self.out_size, self.out_size, generator), grid_out
            )
            self.register_buffer("psi_in", psi_in.float().contiguous())  # [M_in, X]
            self.register_buffer("psi_out", psi_out.float().contiguous())  # [M_out, X']
        else:
            self.psi_in = self.psi_out = None
        self.first = nn.Linear(in_channels * self.in_dim, out_channels)  # U, bU
        self.second = nn.Linear(out_channels * in_channels, self.out_dim)  # V, bV
        self.reset_parameters()

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        # No nonlinearity between the two stages: the first keeps the scale, the second applies the gain.
        _normal_init(self.first, self.in_dim, 1.0)
        _normal_init(self.second, self.in_channels, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        rows = x.flatten(2)  # [B, C, X]
        if self.psi_in is not None:
            rows = rows @ self.psi_in.t()  # [B, C, M_in]
        if self.in_curvature_form:
            z = self.first(block_diagonal_rows(rows))  # [B, C, C']
            y = self.second(block_diagonal_rows(z.transpose(1, 2)))  # [B, C', X' or M_out]
        else:  # the same two maps as batched products, without the block-diagonal zeros
            U = self.first.weight.reshape(self.out_channels, self.in_channels, self.in_dim)
            V = self.second.weight.reshape(self.out_dim, self.out_channels, self.in_channels)
            z = torch.einsum("bcx,dcx->bcd", rows, U) + self.first.bias
            y = torch.einsum("bcd,ydc->bdy", z, V) + self.second.bias
        if self.psi_out is not None:
            y = y @ self.psi_out
        return y.reshape(len(x), self.out_channels, self.out_size, self.out_size)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense map ``[C'·X', C·X]`` (without biases), for checks."""
        c_in, c_out = self.in_channels, self.out_channels
        U = self.first.weight.reshape(c_out, c_in, self.in_dim)
        V = self.second.weight.reshape(self.out_dim, c_out, c_in)
        if self.psi_in is not None:
            U = U @ self.psi_in
            V = torch.einsum("mx,mdc->xdc", self.psi_out, V)
        return torch.einsum("ydc,dcx->dycx", V, U).reshape(c_out * V.shape[0], c_in * U.shape[-1])


class GroupConvPath(_Path, TwoFormModule):
    """GCONV: one circular convolution shared by the |G| copies of a group-lifted input.

    A backbone with this path lifts its input to the four quarter turns of the image, ``[B, G·C, H, W]``
    with copy ``g`` (channels ``g·C … g·C + C − 1``) holding ``rot90(x, g)``, and max-pools over the copies at
    its end. This path applies the same ``C → C'`` convolution to every copy, so it commutes with the cyclic
    shift of the copies that rotating the image by 90° causes: a network of GCONV paths is exactly invariant
    to quarter turns. It is CONV (which sees the ``G·C`` channels as one map) with its weights tied across
    the copies: |G|² times fewer parameters, each one fitted on |G| times as many patches.

    Curvature form: one ``nn.Linear(C·k² → C')`` on the patches ``[B, G·L, C·k²]`` of all copies and
    positions (the library's input factor averages over both).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        stride: int = 1,
        kernel_size: int = 3,
        group_size: int = 4,
    ) -> None:
        super().__init__(in_channels, out_channels, size, stride)
        self.group_size = G = check_int("group_size", group_size)
        if in_channels % G or out_channels % G:
            raise ValueError(
                f"GCONV maps lifted channels G·C → G·C' with G = {G}: in_channels and out_channels must be "
                f"multiples of {G}, got {in_channels} and {out_channels}"
            )
        self.kernel_size = k = check_int("kernel_size", kernel_size)
        self.linear = nn.Linear(in_channels // G * k * k, out_channels // G)
        self.reset_parameters()

    def reset_parameters(self, gain: float = math.sqrt(2)) -> None:
        _normal_init(self.linear, self.linear.in_features, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        G, k, batch = self.group_size, self.kernel_size, len(x)
        copies = x.reshape(batch * G, self.in_channels // G, self.size, self.size)
        if self.in_curvature_form:
            patches = circular_patches(copies, k, self.stride)  # [B·G, C, k², L]
            patches = patches.flatten(1, 2).transpose(1, 2).reshape(batch, -1, self.linear.in_features)
            y = self.linear(patches)  # [B, G·L, C']
            y = y.reshape(batch, G, -1, self.linear.out_features).transpose(2, 3)
        else:
            weight = self.linear.weight.reshape(-1, self.in_channels // G, k, k)
            y = F.conv2d(circular_pad(copies, k), weight, self.linear.bias, stride=self.stride)
        return y.reshape(batch, self.out_channels, self.out_size, self.out_size)


def make_path(
    name: str,
    in_channels: int,
    out_channels: int,
    size: int,
    stride: int = 1,
    *,
    kernel_size: int = 3,
    generator: torch.Generator | None = None,
    group_size: int = 4,
) -> _Path:
    """The path called ``name`` (one of :data:`PATHS`); ``group_size`` is the lifted group's order (GCONV)."""
    if name == "fc":
        return DensePath(in_channels, out_channels, size, stride)
    if name == "conv":
        return ConvPath(in_channels, out_channels, size, stride, kernel_size)
    if name == "ffc":
        return FactoredDensePath(in_channels, out_channels, size, stride)
    if name == "sfc":
        out_size = max(1, size // stride)
        return FactoredDensePath(
            in_channels,
            out_channels,
            size,
            stride,
            in_anchors=anchor_count(SPARSE_FC_FRACTION, size * size),
            out_anchors=anchor_count(SPARSE_FC_FRACTION, out_size * out_size),
            generator=generator,
        )
    if name == "sconv":
        return SparseConvPath(in_channels, out_channels, size, stride, kernel_size, generator=generator)
    if name == "gconv":
        return GroupConvPath(in_channels, out_channels, size, stride, kernel_size, group_size)
    raise ValueError(f"path must be one of {list(PATHS)}, got {name!r}")


class RelaxedLayer(nn.Module):
    """``y = ReLU(mean_p path_p(x))`` over the named paths (FC+CONV: ``ReLU(0.5·(FC(x) + CONV(x)))``).

    Each path starts with the gain ``√(2·n_paths)``, so that the mean of the independent paths, then the ReLU,
    keeps the second moment of the activations through the layers.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        stride: int = 1,
        paths: Sequence[str] = ("fc", "conv"),
        *,
        kernel_size: int = 3,
        generator: torch.Generator | None = None,
        group_size: int = 4,
    ) -> None:
        super().__init__()
        if isinstance(paths, str) or not paths or len(set(paths)) != len(paths):
            raise ValueError(
                f"paths must be a non-empty sequence of distinct names from {PATHS}, got {paths!r}"
            )
        self.paths = nn.ModuleDict(
            {
                name: make_path(
                    name,
                    in_channels,
                    out_channels,
                    size,
                    stride,
                    kernel_size=kernel_size,
                    generator=generator,
                    group_size=group_size,
                )
                for name in paths
            }
        )
        for path in self.paths.values():
            path.reset_parameters(math.sqrt(2 * len(paths)))
        self.out_size = size // stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(sum(path(x) for path in self.paths.values()) / len(self.paths))
