"""Builds acon_cuda._C: the acon ops' C++ kernels (CPU always, CUDA when possible).

Environment: MAX_JOBS (parallel compile jobs) and TORCH_CUDA_ARCH_LIST (GPU
architectures) are honoured by torch.utils.cpp_extension.
"""

import glob
import os
import platform
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


# The CPU kernels are compiled once per instruction set from
# csrc/cpu/acon_c_kernel_impl.h, with PyTorch's flags for its own CPU kernels;
# at run time the op picks the build PyTorch picks. Only on x86-64; elsewhere
# the baseline build alone.
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "csrc/cpu/acon_c_kernel_avx2.cpp": [
        "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
    ],
    "csrc/cpu/acon_c_kernel_avx512.cpp": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}
CPU_SOURCES = rel("csrc/*.cpp", "csrc/cpu/acon_c_cpu.cpp", "csrc/cpu/acon_c_kernel_default.cpp")
if X86_64:
    CPU_SOURCES += list(ISA_FLAGS)
CUDA_SOURCES = rel("csrc/cuda/*.cpp", "csrc/cuda/*.cu")


class BuildExtensionPerIsa(BuildExtension):
    """BuildExtension that compiles each instruction set's kernel file with
    that instruction set's flags (one compiler call per set of flags).

    The objects built with extra flags are linked last: where several objects
    define the same inline function, the linker keeps the first definition,
    and that one must run on any CPU.
    """

    def build_extension(self, ext):
        compile_all = self.compiler.compile

        def compile_per_isa(sources, *args, extra_postargs=None, **kwargs):
            groups = {}
            for source in sources:
                key = os.path.relpath(os.path.abspath(source), ROOT)
                groups.setdefault(tuple(ISA_FLAGS.get(key, [])), []).append(source)
            objects = []
            for flags in sorted(groups, key=len):  # no extra flags first
                post = {k: list(v) for k, v in extra_postargs.items()}
                post["cxx"] += list(flags)
                objects += compile_all(groups[flags], *args, extra_postargs=post, **kwargs)
            return objects

        self.compiler.compile = compile_per_isa
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


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


CXX_FLAGS = ["-O3", "-fopenmp"] + (["-DACON_CPU_X86_VARIANTS"] if X86_64 else [])
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
    cmdclass={"build_ext": BuildExtensionPerIsa},
    python_requires=">=3.9",
    install_requires=["torch"],
)
