import os

import pytest
import torch

from acon_cuda.testing import DEVICES, TEST_SEED, device_available, use_inductor_cache_per_cpu_capability

use_inductor_cache_per_cpu_capability()

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a machine without the test extra (the GPU machine): tests/test_drawn.py skips
    settings = None

# Drawn tests (tests/test_drawn.py) set their own example budgets. In CI the
# same examples every run, and no example database; elsewhere new draws, and
# failures are remembered in .hypothesis/.
if settings is not None:
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


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
