import pytest
import torch

from acon_cuda.testing import DEVICES, device_available


@pytest.fixture(params=DEVICES)
def device(request):
    if not device_available(request.param):
        pytest.skip(f"no {request.param} device with acon kernels here")
    return request.param


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
