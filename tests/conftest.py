import os

import pytest
import torch
from hypothesis import settings

# Property tests (test_properties.py): a CI-sized budget by default, a longer one on demand.
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("SYMKERNELS_HYPOTHESIS_PROFILE", "ci"))

# Without a GPU the Triton kernels' tests run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when
# a kernel is decorated, i.e. when symkernels (which imports the kernels) is first imported: this runs before
# any test module is collected. An explicit TRITON_INTERPRET in the environment is left as it is.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("triton", marks=pytest.mark.triton),
        pytest.param("cuda", marks=pytest.mark.cuda),
    ]
)
def implementation(request: pytest.FixtureRequest):
    """Each implementation of the ops (``tests.testing.Implementation``): the native CPU kernels, the Triton
    kernels (on the GPU, or in Triton's CPU interpreter without one) and the native CUDA kernels."""
    from tests.testing import implementation_for

    return implementation_for(request.param)


@pytest.fixture
def gpu() -> torch.device:
    """The GPU, for cases too big for the Triton interpreter (the ``cuda`` marker skips them without one)."""
    from symkernels.ops.triton_support import INTERPRETED

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the Triton kernels run interpreted on CPU tensors here")
    return torch.device("cuda")


@pytest.fixture
def triton_device() -> torch.device:
    """Where the Triton kernels run here (``test_sinkhorn_triton.py``, ``test_expansion_triton.py``): CPU
    tensors under the interpreter, else the GPU (or a skip)."""
    from tests.testing import implementation_for

    return implementation_for("triton").device
