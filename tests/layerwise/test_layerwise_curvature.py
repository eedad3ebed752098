"""The KFAC Laplace marginal likelihood: factors of every relaxed path against brute force, the δ gradient
against MacKay's closed form, the effective dimensions, and the circular-padding pitfall."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.testing import require_extras

require_extras("train", "layerwise")

from symkernels.layerwise import RelaxedBackbone, curvature_form, fit_curvature, make_path, prior_parameters  # noqa: E402
from symkernels.layerwise.marglik import check_curvature_model  # noqa: E402
from symkernels.layerwise.models import parse_blocks  # noqa: E402
from symkernels.layerwise.sharing import SharingLayer  # noqa: E402

CLASSES = 3


class PathNet(nn.Module):
    """One module under test, then a linear head on its flattened output."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(features, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _data(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64), torch.randint(
        0, CLASSES, (n,), generator=generator
    )


def _kron_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """laplace's Kronecker-factored curvature of each tensor, as a dense matrix."""
    curvature = fit_curvature(model, x, y, batch_size=len(x))
    blocks = {}
    for name, factors in zip(curvature.names, curvature.laplace.H_facs.kfacs, strict=True):
        blocks[name] = torch.kron(factors[0], factors[1]) if len(factors) == 2 else factors[0]
    return blocks


def _brute_force_ggn(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` for the tensor ``name``, one autograd row per logit."""
    param = dict(model.named_parameters())[name]
    logits = model(x)
    rows = [
        torch.autograd.grad(logits[n, c], param, retain_graph=True)[0].flatten()
        for n in range(len(x))
        for c in range(CLASSES)
    ]
    jacobian = torch.stack(rows).reshape(len(x), CLASSES, -1)
    p = logits.softmax(-1).detach()
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", jacobian, hessian, jacobian)


# Configurations where each path's linear map acts once per datum: there, with one datum, KFAC is exact.
SINGLE_INSTANCE = {
    "fc": (lambda: make_path("fc", 2, 3, 2), (2, 2, 2), 12),
    "conv": (lambda: make_path("conv", 2, 3, 1), (2, 1, 1), 3),
    "sconv": (lambda: make_path("sconv", 2, 3, 1), (2, 1, 1), 3),
    "ffc": (lambda: make_path("ffc", 1, 1, 3), (1, 3, 3), 9),
    "sfc": (lambda: make_path("sfc", 1, 1, 4, 2), (1, 4, 4), 4),
    "ws+free": (lambda: SharingLayer(2, 2, lifting=True, group_size=1, stack="exact"), (2, 1, 1), 2),
}


@pytest.mark.parametrize("case", sorted(SINGLE_INSTANCE))
def test_kronecker_factors_equal_the_brute_force_ggn_of_one_datum(case):
    make, shape, features = SINGLE_INSTANCE[case]
    torch.manual_seed(0)
    model = PathNet(make(), features).double()
    x, y = _data(1, shape)
    blocks = _kron_blocks(model, x, y)
    tested = [name for name in blocks if name.startswith("layer.")]
    assert tested
    for name in tested:
        torch.testing.assert_close(blocks[name], _brute_force_ggn(model, name, x), rtol=1e-7, atol=1e-10)


def _expand_kfac_reference(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KFAC-expand from its definition: ``A = mean over data and instances of a aᵀ``,
    ``B = Σ_n Σ_r J_rᵀ Λ_n J_r`` with ``J_r`` the Jacobian of the logits with respect to the module's output
    at instance ``r``."""
    captured = {}

    def hook(_module, inputs, output):
        captured["input"] = inputs[0].detach()
        probe = torch.zeros_like(output, requires_grad=True)
        captured["probe"] = probe
        return output + probe

    handle = module.register_forward_hook(hook)
    with curvature_form(model):
        logits = model(x)
    handle.remove()
    probe = captured["probe"]
    per_class = torch.stack(
        [torch.autograd.grad(logits[:, c].sum(), probe, retain_graph=True)[0] for c in range(CLASSES)], dim=1
    )  # [N, classes, *output]: samples do not interact
    inputs = captured["input"]
    if isinstance(module, nn.Conv2d):
        inputs = F.unfold(inputs, module.kernel_size, stride=module.stride).transpose(1, 2)  # [N, L, C·k²]
        per_class = per_class.flatten(3).transpose(2, 3)  # [N, classes, L, C']
    n = len(x)
    inputs = inputs.reshape(n, -1, inputs.shape[-1])
    jac = per_class.reshape(n, CLASSES, -1, per_class.shape[-1])  # [N, classes, R, d_out]
    p = logits.softmax(-1).detach()
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    A = torch.einsum("nri,nrj->ij", inputs, inputs) / (n * inputs.shape[1])
    B = torch.einsum("ncri,ncd,ndrj->ij", jac, hessian, jac)
    return B, A


@pytest.mark.parametrize(
    "name, stride", [("conv", 1), ("conv", 2), ("sconv", 1), ("gconv", 1), ("gconv", 2), ("ffc", 1)]
)
def test_shared_paths_get_the_expand_factors_averaged_over_every_instance(name, stride):
    torch.manual_seed(0)
    lift = 4 if name == "gconv" else 1  # GCONV maps four copies of 2 channels to four of 3
    path = make_path(name, 2 * lift, 3 * lift, 4, stride)
    model = PathNet(path, 3 * lift * (4 // stride) ** 2).double()
    x, y = _data(5, (2 * lift, 4, 4))
    curvature = fit_curvature(model, x, y, batch_size=5)
    factors = dict(zip(curvature.names, curvature.laplace.H_facs.kfacs, strict=True))
    modules = [(n, m) for n, m in path.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for module_name, module in modules:
        B, A = _expand_kfac_reference(model, module, x)
        B_lib, A_lib = factors[f"layer.{module_name}.weight"]
        torch.testing.assert_close(A_lib, A, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(B_lib, B, rtol=1e-7, atol=1e-12)


def test_sparse_conv_factors_are_the_dense_conv_factors_mapped_through_psi():
    torch.manual_seed(0)
    sparse = make_path("sconv", 2, 3, 4).double()
    dense = make_path("conv", 2, 3, 4).double()
    with torch.no_grad():
        dense.conv.weight.copy_(sparse.dense_weight())
        dense.conv.bias.copy_(sparse.conv.bias)
    x, y = _data(6, (2, 4, 4))
    head = nn.Linear(48, CLASSES).double()
    factors = {}
    for label, path in (("sparse", sparse), ("dense", dense)):
        model = PathNet(path, 48).double()
        model.head.load_state_dict(head.state_dict())
        curvature = fit_curvature(model, x, y, batch_size=6)
        factors[label] = curvature.laplace.H_facs.kfacs[0]
    projection = torch.kron(torch.eye(2, dtype=torch.float64), sparse.psi.double())  # I ⊗ Ψ: [C·M, C·k²]
    B_u, A_u = factors["sparse"]
    B_w, A_w = factors["dense"]
    torch.testing.assert_close(A_u, projection @ A_w @ projection.T, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(B_u, B_w, rtol=1e-6, atol=1e-10)


def test_circular_convolution_patches_enter_the_input_factor():
    torch.manual_seed(0)
    path = make_path("conv", 1, 2, 4).double()
    model = PathNet(path, 32).double()
    x, y = _data(4, (1, 4, 4))
    A = fit_curvature(model, x, y, batch_size=4).laplace.H_facs.kfacs[0][1]
    # Patches read with wrap-around, built independently with torch.roll.
    shifts = [torch.roll(x, (1 - dy, 1 - dx), dims=(-2, -1)) for dy in range(3) for dx in range(3)]
    patches = torch.stack(shifts, dim=2).permute(0, 3, 4, 1, 2).reshape(-1, 9)  # [N·H·W, C·k²]
    torch.testing.assert_close(A, patches.T @ patches / len(patches), rtol=1e-7, atol=1e-12)


def test_a_convolution_that_pads_by_itself_is_refused_because_the_libraries_ignore_padding_mode():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(32, 3)
    )
    with pytest.raises(ValueError, match=r"0 is a Conv2d with padding=\(1, 1\).*pad the input explicitly"):
        check_curvature_model(model)
    x, y = _data(2, (1, 4, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        fit_curvature(model.double(), x, y)
    # The pitfall itself: laplace + curvlinops, called directly, read zero-padded patches.
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    laplace = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvlinopsGGN
    )
    laplace.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2))
    A = laplace.H_facs.kfacs[0][1]
    zero_padded = F.unfold(F.pad(x, (1, 1, 1, 1)), 3).transpose(1, 2).reshape(-1, 9)
    torch.testing.assert_close(A, zero_padded.T @ zero_padded / len(zero_padded))


def _tiny_backbone() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = RelaxedBackbone(1, CLASSES, size=4, width=2, blocks=parse_blocks("1:2,1:2")).double()
    x, y = _data(16, (1, 4, 4), seed=2)
    return model, x, y


def _dense_terms(model, x, y, curvature):
    """Per tensor: θ, the dense H_l = B ⊗ A, from the laplace factors but without laplace's algebra."""
    params = dict(model.named_parameters())
    thetas = [params[name].detach().flatten() for name in curvature.names]
    blocks = [torch.kron(f[0], f[1]) if len(f) == 2 else f[0] for f in curvature.laplace.H_facs.kfacs]
    nll = F.cross_entropy(model(x), y, reduction="sum").detach()
    return thetas, blocks, nll


def test_log_marginal_likelihood_gradient_and_effective_dimensions_match_dense_formulas():
    model, x, y = _tiny_backbone()
    curvature = fit_curvature(model, x, y, batch_size=8)
    assert curvature.names == [name for name, _ in prior_parameters(model)]
    assert model.training  # restored after laplace put it in eval mode
    thetas, blocks, nll = _dense_terms(model, x, y, curvature)
    delta = torch.rand(len(thetas), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5 + 0.1
    delta.requires_grad_(True)
    value = curvature.log_marginal_likelihood(delta)
    (gradient,) = torch.autograd.grad(value, delta)
    expected_value, closed_form, gamma = -nll, [], []
    for theta, H, d in zip(thetas, blocks, delta.detach(), strict=True):
        eye = torch.eye(len(H), dtype=torch.float64)
        expected_value = expected_value - 0.5 * d * theta.square().sum()
        expected_value = expected_value - 0.5 * (torch.logdet(H + d * eye) - len(H) * torch.log(d))
        mu = torch.linalg.eigvalsh(H)
        # MacKay: ∂/∂δ = −½||θ||² − ½ Σ 1/(μ + δ) + P/(2δ)
        closed_form.append(-0.5 * theta.square().sum() - 0.5 * (1 / (mu + d)).sum() + len(H) / (2 * d))
        gamma.append(torch.trace(H @ torch.linalg.inv(H + d * eye)))
    torch.testing.assert_close(value.detach(), expected_value, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(gradient, torch.stack(closed_form), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        curvature.effective_dimensions(delta), torch.stack(gamma), rtol=1e-6, atol=1e-8
    )


def test_curvature_refuses_bad_input():
    model, x, y = _tiny_backbone()
    curvature = fit_curvature(model, x, y)
    with pytest.raises(ValueError, match="delta must have shape"):
        curvature.log_marginal_likelihood(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="one length"):
        fit_curvature(model, x, y[:3])
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        fit_curvature(nn.Sequential(nn.Flatten()), x, y)
