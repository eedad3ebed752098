"""The Triton Sinkhorn kernels' accuracy with a GPU's float32 arithmetic, on the CPU.

Triton's interpreter computes every float32 operation correctly rounded, while compiled for an NVIDIA GPU a
float32 ``/`` is ``div.full.f32`` and ``tl.exp`` is ``ex2.approx.f32`` of a rounded product, each a few ulps
off (``tests.triton_testing.gpu_float32_arithmetic`` lists them and emulates each at its worst error). The
kernels compute exponentials with ``precise_exp`` and divide with ``div_rn``, neither approximate; this checks
that, with everything else the GPU computes approximately made so here, P and the gradients still meet the
accuracy bound of the test suite (tests/testing.py), and that the two helpers are as accurate as they claim.
The compiled kernels' instructions are checked in tests/install/test_triton_compile.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from symkernels.ops.triton_support import INTERPRETED  # noqa: E402
from symkernels.triton_kernels.sinkhorn_tiles import precise_exp, reciprocal  # noqa: E402
from tests.ops.test_sinkhorn_triton import (  # noqa: E402
    EARLY_EXIT_CASES,
    LAYOUTS,
    make_stacks,
    run_and_check,
)
from tests.triton_testing import gpu_float32_arithmetic  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not INTERPRETED, reason="emulates the GPU's arithmetic in Triton's CPU interpreter"),
]


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i)
    y = tl.load(y_ptr + i)
    tl.store(out_ptr + 0 * BLOCK + i, x / y)
    tl.store(out_ptr + 1 * BLOCK + i, tl.exp(x))
    tl.store(out_ptr + 2 * BLOCK + i, tl.exp2(x))
    tl.store(out_ptr + 3 * BLOCK + i, tl.log(y))
    tl.store(out_ptr + 4 * BLOCK + i, precise_exp(x))
    tl.store(out_ptr + 5 * BLOCK + i, reciprocal(y))


def elementwise(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    out = torch.empty(6 * x.numel(), dtype=torch.float32)
    _elementwise_kernel[(1,)](x, y, out, BLOCK=x.numel())
    names = ("divide", "exp", "exp2", "log", "precise_exp", "reciprocal")
    return dict(zip(names, out.view(6, -1).numpy(), strict=True))


def ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in ulps of ``want`` rounded to float32."""
    want32 = want.astype(np.float32)
    spacing = np.spacing(np.abs(want32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing


def test_the_emulation_moves_the_approximate_operations():
    """Under the emulation the approximate operations are off by their documented error (tl.exp by far more at
    large |x|, from its rounded product); the precise forms give the same bits with and without it (they use
    no approximate operation), within 1.5 ulps (exp) and correctly rounded (reciprocal)."""
    x = torch.linspace(-80.0, 2.0, 64, dtype=torch.float32)
    y = torch.linspace(0.3, 7.0, 64, dtype=torch.float32)
    x64, y64 = x.double().numpy(), y.double().numpy()
    exact = {
        "divide": x64 / y64,
        "exp": np.exp(x64),
        "exp2": np.exp2(x64),
        "log": np.log(y64),
        "precise_exp": np.exp(x64),
        "reciprocal": 1.0 / y64,
    }
    plain = elementwise(x, y)
    with gpu_float32_arithmetic():
        gpu = elementwise(x, y)
    errors = {name: ulps(gpu[name], exact[name]) for name in exact}
    # (2 ulps down from a power of two are 1 ulp of the spacing above it.)
    assert 0.9 <= errors["divide"].min() and errors["divide"].max() <= 2.5
    assert 0.9 <= errors["exp2"].min() and errors["exp2"].max() <= 2.5
    moved = y64 != 1.0  # log(1) = 0 stays
    assert 0.4 <= errors["log"][moved].min() and errors["log"].max() <= 1.5
    assert errors["exp"].max() > 20  # x·log2e rounded at |x| = 80: ~eps·115 relative
    for name in ("precise_exp", "reciprocal"):
        assert np.array_equal(gpu[name], plain[name]), name
    assert errors["precise_exp"].max() <= 1.5 and errors["reciprocal"].max() <= 0.5 + 1e-9


def test_precise_exp_over_the_float_range():
    """Within 1.5 ulps where the result is normal, within the smallest subnormal below, 0 and inf past the
    range, NaN kept."""
    x = torch.tensor(
        [float("-inf"), -200.0, -104.5, -103.9, -100.0, -90.0, -87.4, -87.3, -60.0, -40.25, -20.0, -1e-3,
         -0.0, 0.0, 1e-6, 0.3465, 0.3466, 1.0, 20.0, 60.0, 88.0, 88.5, 88.72, 88.73, 89.5, 200.0,
         float("inf"), float("nan")],
        dtype=torch.float32,
    )  # fmt: skip
    x = torch.cat([x, torch.linspace(-87.0, 88.0, 2**12 - x.numel(), dtype=torch.float32)])
    with gpu_float32_arithmetic():
        got = elementwise(x, torch.ones_like(x))["precise_exp"]
    with np.errstate(over="ignore"):
        want = np.exp(x.double().numpy())
    tiny = np.finfo(np.float32).tiny
    normal = (want >= tiny) & (want <= np.finfo(np.float32).max)
    assert float(ulps(got[normal], want[normal]).max()) <= 1.5
    below = want < tiny
    assert float(np.abs(got[below] - want[below]).max()) <= 2.0**-149
    assert bool(np.isposinf(got[want > np.finfo(np.float32).max]).all())
    assert bool(np.isnan(got[np.isnan(want)]).all())


# Every layout with matrices of n = 1 (an exactly zero gradient), both domains, the tolerance exit; the log
# domain's backward is where approximate exponentials broke the bound (up to 1.24x of it).
CASES = [("ragged", layout) for layout in LAYOUTS] + [
    ("scaling", "packed"),
    ("scaling", "chunked"),
    ("log", "packed"),
    ("log", "chunked"),
    ("log", "stepped"),
]


@pytest.mark.parametrize(("case", "layout"), CASES, ids=[f"{c}-{layout}" for c, layout in CASES])
def test_sinkhorn_meets_the_accuracy_bound_with_the_gpus_arithmetic(case, layout, triton_device, monkeypatch):
    with gpu_float32_arithmetic():
        if case == "ragged":
            stacks = make_stacks([1, 12, 5, 3], [2, 0, 1, 2])
            run_and_check(stacks, 3, 0.7, 0.0, triton_device, monkeypatch, layout=layout)
        else:
            sizes, counts, n_iter, tau, tol, scale, seed = EARLY_EXIT_CASES[case]
            stacks = make_stacks(sizes, counts, scale=scale, seed=seed)
            run_and_check(stacks, n_iter, tau, tol, triton_device, monkeypatch, layout=layout)
