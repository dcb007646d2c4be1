import pytest
import torch

from acon_cuda.testing import DEVICES, TEST_SEED, device_available


def pytest_runtest_setup(item):
    # The one test of "needs the CUDA kernels": a GPU, and a build with them.
    if item.get_closest_marker("cuda") and not device_available("cuda"):
        pytest.skip("no GPU with this build's acon CUDA kernels here")


@pytest.fixture(params=DEVICES)
def device(request):
    if not device_available(request.param):
        pytest.skip(f"no {request.param} device with acon kernels here")
    return request.param


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(TEST_SEED)
