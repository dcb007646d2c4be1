"""Builds acon_cuda._C: the acon ops' C++ kernels (CPU always, CUDA when possible).

Environment: MAX_JOBS (parallel compile jobs) and TORCH_CUDA_ARCH_LIST (GPU
architectures) are honoured by torch.utils.cpp_extension.
"""

import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    return [os.path.relpath(path, ROOT) for path in found]


# The baseline CPU kernel object must come before the AVX2 / AVX-512 ones (see
# csrc/cpu/acon_c_kernel_default.cpp), hence the explicit order.
CPU_SOURCES = rel(
    "csrc/*.cpp",
    "csrc/cpu/acon_c_cpu.cpp",
    "csrc/cpu/acon_c_kernel_default.cpp",
    "csrc/cpu/acon_c_kernel_avx2.cpp",
    "csrc/cpu/acon_c_kernel_avx512.cpp",
)
CUDA_SOURCES = rel("csrc/cuda/*.cpp", "csrc/cuda/*.cu")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.realpath(path)
    return None


def cuda_build_problem():
    """None when the CUDA kernels can be built, else why not (one short line)."""
    if not CUDA_SOURCES:
        return "this version has no CUDA kernels"
    if torch.version.cuda is None:
        return "torch %s is a CPU-only build" % torch.__version__
    nvcc = find_nvcc()
    if nvcc is None:
        return "no nvcc found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        return "could not read the version of %s" % nvcc
    if match.group(1) != torch.version.cuda.split(".")[0]:
        return "nvcc %s.%s does not match torch's CUDA %s" % (
            match.group(1), match.group(2), torch.version.cuda)
    # torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc gives
    # /usr/local, where libcudart is not): point it at the real toolkit.
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
    return None


CXX_FLAGS = ["-O3", "-fopenmp"]
problem = cuda_build_problem()
if problem is None:
    extension = CUDAExtension(
        "acon_cuda._C",
        CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
else:
    print("acon_cuda: building the CPU kernels only (%s)" % problem)
    extension = CppExtension(
        "acon_cuda._C",
        CPU_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="acon_cuda",
    version="0.1.0",
    description="Fused ACON activations (ACON-A/B/C, Meta-ACON) for PyTorch",
    packages=find_packages(include=["acon_cuda", "acon_cuda.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch"],
)
