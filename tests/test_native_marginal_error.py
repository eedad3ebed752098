"""symkernels::marginal_error: native kernels against a pure-PyTorch formula, opcheck, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from symkernels import _native
from symkernels.ops.marginal_error import marginal_error

STATUS = _native.native_status()
requires_native = pytest.mark.skipif(
    not STATUS.loaded, reason=f"native library symkernels._C not loaded: {STATUS.reason}"
)

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
SIZES = [1, 2, 7, 25, 100, 300]  # 300 > 256 threads: several columns per CUDA thread
BATCHES = [(), (3,), (2, 3), (0,)]
# float32 on CUDA accumulates in float32 (n·eps of the sums); the CPU accumulates in float64.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
# The pure-PyTorch path accumulates half precision in float32: only the final rounding remains.
HALF_TOLERANCES = {torch.float16: {"rtol": 1e-3, "atol": 1e-3}, torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3}}


def expected(p: torch.Tensor) -> torch.Tensor:
    """The definition, in float64 on the CPU."""
    p64 = p.detach().to("cpu", torch.float64)
    row_errors = (p64.sum(dim=-1) - 1).abs()
    col_errors = (p64.sum(dim=-2) - 1).abs()
    return torch.cat([row_errors, col_errors], dim=-1).amax(dim=-1)


def near_doubly_stochastic(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Positive entries around 1/n, so marginals are O(1) away from 1 and differ per row and column."""
    generator = torch.Generator().manual_seed(seed)
    n = shape[-1]
    return (2 * torch.rand(*shape, generator=generator, dtype=torch.float64) / n).to(dtype)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    if not STATUS.loaded:
        pytest.skip(f"native library symkernels._C not loaded: {STATUS.reason}")
    if request.param == "cuda" and not STATUS.cuda_built:
        pytest.skip("symkernels._C was built without CUDA kernels")
    return request.param


def native_op(p: torch.Tensor) -> torch.Tensor:
    return torch.ops.symkernels.marginal_error(p)


def check(p: torch.Tensor) -> None:
    out = native_op(p)
    assert out.shape == p.shape[:-2]
    assert out.dtype == p.dtype
    assert out.device == p.device
    torch.testing.assert_close(out.cpu().double(), expected(p), **TOLERANCES[p.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_matches_definition(device: str, dtype: torch.dtype, batch: tuple[int, ...], n: int) -> None:
    check(near_doubly_stochastic(*batch, n, n, dtype=dtype).to(device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_expanded_inputs(device: str, dtype: torch.dtype) -> None:
    base = near_doubly_stochastic(4, 14, 14, dtype=dtype).to(device)
    transposed = base.transpose(-1, -2)
    strided = base[:, ::2, ::2]
    expanded = base[0].expand(5, 14, 14)
    batch_sliced = base[::2]
    for p in (transposed, strided, expanded, batch_sliced):
        assert not p.is_contiguous()
        check(p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_and_columns_both_count(device: str, dtype: torch.dtype) -> None:
    # Rows exact, columns off by 1 / columns exact, rows off by 1 / doubly stochastic / a permutation.
    rows_exact = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    permutation = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    p = torch.stack([rows_exact, rows_exact.T, torch.full((2, 2), 0.5), permutation])
    out = native_op(p.to(device, dtype))
    torch.testing.assert_close(out.cpu(), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(device: str, dtype: torch.dtype) -> None:
    p = near_doubly_stochastic(3, 7, 7, dtype=dtype)
    p[1, 4, 2] = float("nan")
    out = native_op(p.to(device)).cpu()
    assert out[1].isnan()
    assert out[[0, 2]].isfinite().all()


@pytest.mark.parametrize("shape", [(5, 5), (3, 7, 7), (2, 2, 4, 4), (0, 3, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    p = near_doubly_stochastic(*shape, dtype=dtype).to(device)
    torch.library.opcheck(torch.ops.symkernels.marginal_error.default, (p,))


def test_compiles_without_graph_breaks(device: str) -> None:
    p = near_doubly_stochastic(6, 9, 9, dtype=torch.float32).to(device)
    compiled = torch.compile(marginal_error, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(p), native_op(p))


@requires_native
@pytest.mark.parametrize(
    ("p", "message"),
    [
        (torch.ones(3), "shape"),
        (torch.ones(2, 3, 4), "square"),
        (torch.ones(2, 0, 0), "n >= 1"),
        (torch.ones(3, 3, dtype=torch.int64), "float32 or float64"),
        (torch.ones(3, 3, dtype=torch.float16), "float32 or float64"),
    ],
    ids=["1d", "non-square", "empty-matrix", "int64", "float16"],
)
def test_native_op_rejects_bad_input(p: torch.Tensor, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        native_op(p)


@pytest.mark.parametrize(
    ("p", "error"),
    [
        (torch.ones(3), ValueError),
        (torch.ones(2, 3, 4), ValueError),
        (torch.ones(2, 0, 0), ValueError),
        (torch.ones(3, 3, dtype=torch.int64), TypeError),
        (torch.ones(3, 3, dtype=torch.bool), TypeError),
        ([[1.0, 0.0], [0.0, 1.0]], TypeError),
    ],
    ids=["1d", "non-square", "empty-matrix", "int64", "bool", "list"],
)
def test_entry_point_validates_p(p: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"\bp\b"):
        marginal_error(p)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_entry_point_any_floating_dtype(dtype: torch.dtype) -> None:
    # float16/bfloat16 have no native kernel: the pure-PyTorch path serves them.
    p = near_doubly_stochastic(2, 3, 6, 6, dtype=dtype)
    out = marginal_error(p)
    assert out.shape == (2, 3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected(p), **{**TOLERANCES, **HALF_TOLERANCES}[dtype])


def test_entry_point_result_carries_no_gradient() -> None:
    p = near_doubly_stochastic(3, 4, 4, dtype=torch.float64).requires_grad_()
    out = marginal_error(p)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected(p))


def test_entry_point_on_meta_tensors() -> None:
    out = marginal_error(torch.empty(4, 5, 6, 6, device="meta"))
    assert out.shape == (4, 5)
    assert out.device.type == "meta"
