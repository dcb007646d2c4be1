"""What the compiled extension was built against, checked at import: an
extension built for another torch fails with undefined symbols or, worse,
loads and misbehaves, so a mismatch of torch's major.minor (or of the CUDA
major version) raises an ImportError that says to rebuild."""

import importlib

import torch

REBUILD = (
    "Rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall . "
    "(in the source tree), or install a wheel built for this torch."
)


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def mismatch(built_torch, built_cuda, running_torch, running_cuda):
    """Why an extension built for (built_torch, built_cuda) cannot load in
    (running_torch, running_cuda), or None when it can."""
    if major_minor(built_torch) != major_minor(running_torch):
        return (
            f"acon_cuda was built against torch {major_minor(built_torch)} ({built_torch}), "
            f"but torch {running_torch} is installed. "
        )
    if built_cuda is not None and running_cuda is not None and built_cuda.split(".")[0] != running_cuda.split(".")[0]:
        return (
            f"acon_cuda's CUDA kernels were built for CUDA {built_cuda}, but torch {running_torch} uses "
            f"CUDA {running_cuda}. "
        )
    if built_cuda is not None and running_cuda is None:
        return (
            f"acon_cuda was built with CUDA kernels (CUDA {built_cuda}), "
            f"but torch {running_torch} is a CPU-only build. "
        )
    return None


def check_build() -> str:
    """The package's full version, after checking the build against the
    running torch (ImportError on a mismatch or a missing build)."""
    try:
        info = importlib.import_module("acon_cuda._build_info")
    except ImportError:
        raise ImportError(
            "acon_cuda is not built: its extension and acon_cuda/_build_info.py come from the build. " + REBUILD
        ) from None
    why = mismatch(info.TORCH_VERSION, info.CUDA_VERSION, torch.__version__, torch.version.cuda)
    if why is not None:
        raise ImportError(why + REBUILD)
    return info.VERSION
