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
