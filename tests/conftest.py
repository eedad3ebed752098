import os

import pytest
import torch

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


# The Triton tests' devices (test_triton_*.py).
@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run in this process: CPU under the interpreter, else the GPU."""
    from symkernels.ops.triton_registration import INTERPRETED

    if INTERPRETED:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("the triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture
def gpu() -> torch.device:
    """The GPU, for Triton cases too big for the interpreter (the ``cuda`` marker skips them without one)."""
    from symkernels.ops.triton_registration import INTERPRETED

    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels run interpreted on CPU tensors in this process")
    return torch.device("cuda")
