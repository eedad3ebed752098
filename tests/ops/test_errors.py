"""Bad input raises a clear ValueError/TypeError that names the argument."""

from __future__ import annotations

import math

import pytest
import torch

import symkernels
from symkernels.nn import DoublyStochasticStack, FixedStack, WSConv2d, WSLiftConv2d


@pytest.mark.parametrize(
    "logits,error,match",
    [
        (torch.tensor(1.0), ValueError, "logits must have at least 2 dimensions"),
        (torch.ones(4), ValueError, "logits must have at least 2 dimensions"),
        (torch.ones(3, 4), ValueError, "logits must be square"),
        (torch.ones(2, 3, 4), ValueError, "logits must be square"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "logits must have a floating dtype"),
        (torch.ones(3, 3, dtype=torch.bool), TypeError, "logits must have a floating dtype"),
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_logits(logits, error, match):
    with pytest.raises(error, match=match):
        symkernels.sinkhorn(logits)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"n_iter": 0}, ValueError, "n_iter must be >= 1"),
        ({"n_iter": -3}, ValueError, "n_iter must be >= 1"),
        ({"n_iter": 2.0}, TypeError, "n_iter must be an int"),
        ({"tau": 0.0}, ValueError, "tau must be a finite number > 0"),
        ({"tau": -1.0}, ValueError, "tau must be a finite number > 0"),
        ({"tau": math.inf}, ValueError, "tau must be a finite number > 0"),
        ({"tau": math.nan}, ValueError, "tau must be a finite number > 0"),
        ({"tau": "1"}, TypeError, "tau must be a float"),
    ],
)
def test_bad_iteration_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        symkernels.sinkhorn(torch.rand(3, 3), **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_read_only_when_checked(bad):
    """By default nothing is read back: the poisoned matrix comes out as it may, the others exactly as alone;
    check_finite=True raises, naming the argument."""
    logits = torch.rand(2, 4, 4)
    logits[1, 2, 3] = bad
    out = symkernels.sinkhorn(logits)
    assert out.shape == logits.shape
    assert torch.equal(out[0], symkernels.sinkhorn(logits[:1])[0])  # other matrices are unaffected
    with pytest.raises(ValueError, match=r"logits contains NaN or Inf \(check_finite=True\)"):
        symkernels.sinkhorn(logits, check_finite=True)
    with pytest.raises(ValueError, match=r"stacks\[1\] contains NaN or Inf"):
        symkernels.grouped_sinkhorn([logits[:1], logits[1:]], check_finite=True)


def test_stack_module_checks_finite_logits_on_request():
    unchecked, checked = DoublyStochasticStack(3, 4), DoublyStochasticStack(3, 4, check_finite=True)
    with torch.no_grad():
        checked.logits[0, 0, 0] = math.nan
        unchecked.logits[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="logits contains NaN or Inf"):
        checked()
    assert torch.isnan(unchecked()[1]).any()  # the identity is element 0; the poisoned matrix is element 1


@pytest.mark.parametrize(
    "reps,weight,k,error,match",
    [
        (
            torch.rand(4, 9, 9),
            torch.rand(2, 3, 8),
            3,
            ValueError,
            r"weight's last dimension \(8\) must equal",
        ),
        (torch.rand(4, 9, 8), torch.rand(2, 3, 9), 3, ValueError, "reps must be square"),
        (torch.rand(9, 9), torch.rand(2, 3, 9), 3, ValueError, r"reps must have shape \[G, d, d\]"),
        (torch.rand(4, 9, 9), torch.rand(3, 9), 3, ValueError, r"weight must have shape \[C_out, C_in, d\]"),
        (torch.rand(4, 8, 8), torch.rand(2, 3, 8), 3, ValueError, "kernel_size=3: k² = 9 must divide d = 8"),
        (torch.rand(4, 9, 9), torch.rand(2, 3, 9), 0, ValueError, "kernel_size must be >= 1"),
        (torch.rand(4, 9, 9), torch.rand(2, 3, 9), 3.0, TypeError, "kernel_size must be an int"),
        (torch.rand(4, 9, 9), torch.rand(2, 3, 9, dtype=torch.float64), 3, TypeError, "weight has dtype"),
        (
            torch.rand(4, 9, 9),
            torch.ones(2, 3, 9, dtype=torch.int32),
            3,
            TypeError,
            "weight must have a floating",
        ),
        (
            torch.rand(4, 9, 9, device="meta"),
            torch.rand(2, 3, 9),
            3,
            ValueError,
            "weight is on cpu but reps is on meta",
        ),
    ],
)
def test_bad_expansion_arguments(reps, weight, k, error, match):
    with pytest.raises(error, match=match):
        symkernels.expand_kernel(reps, weight, k)
    with pytest.raises(error, match=match):
        symkernels.permuted_conv2d(torch.rand(1, 3, 4, 6, 6), reps, weight, kernel_size=k)


@pytest.mark.parametrize(
    "x,bias,match",
    [
        (torch.rand(2, 3, 6, 6), None, r"x has shape \(2, 3, 6, 6\) \(no group axis\)"),
        (torch.rand(2, 3, 2, 6, 6), None, r"x's group axis \(dim 2\) has size 2, expected G_in = 4"),
        (torch.rand(2, 5, 4, 6, 6), None, r"x has 5 channels \(dim 1\), weight expects C_in = 3"),
        (torch.rand(3, 4, 6, 6, 1, 1), None, r"x must have shape \[B, C, H, W\] or \[B, C, G, H, W\]"),
        (torch.rand(6, 6), None, r"x must have shape"),
        (torch.rand(2, 3, 4, 6, 6), torch.rand(3, 1, 1, 1), r"bias must have shape \[C_out\]"),
        (torch.rand(2, 3, 4, 6, 6, device="meta"), None, "is on"),
    ],
)
def test_bad_convolution_input(x, bias, match):
    reps, weight = torch.rand(4, 36, 36), torch.rand(2, 3, 36)
    with pytest.raises(ValueError, match=match):
        symkernels.permuted_conv2d(x, reps, weight, bias, kernel_size=3)


def test_modules_reject_wrong_input_shapes():
    with pytest.raises(ValueError, match=r"x's group axis \(dim 2\) has size 2, expected G_in = 4"):
        WSConv2d(3, 2, 3)(torch.rand(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="x has 4 channels"):
        WSLiftConv2d(3, 2, 3)(torch.rand(1, 4, 8, 8))


@pytest.mark.parametrize("argument", ["kernel_size", "group_size", "in_channels", "out_channels"])
def test_modules_reject_non_positive_sizes(argument):
    kwargs = {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "group_size": 4, argument: 0}
    with pytest.raises(ValueError, match=f"{argument} must be >= 1"):
        WSConv2d(**kwargs)
    with pytest.raises(ValueError, match=f"{argument} must be >= 1"):
        WSLiftConv2d(**kwargs)


def test_stack_arguments_are_checked():
    with pytest.raises(ValueError, match="n_iter must be >= 1"):
        DoublyStochasticStack(4, 9, n_iter=0)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        WSConv2d(2, 2, 3, tau=0.0)
    with pytest.raises(ValueError, match=r"matrices must have shape \[G, d, d\]"):
        FixedStack(torch.eye(3))
    with pytest.raises(ValueError, match="matrices must be square"):
        FixedStack(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"in_group_size must be >= 1"):
        WSConv2d(2, 2, 3, in_group_size=0)
