"""Builds acon_cuda._C: the acon ops' C++ kernels (CPU always, CUDA when possible).

Environment: MAX_JOBS (parallel compile jobs) and TORCH_CUDA_ARCH_LIST (GPU
architectures) are honoured by torch.utils.cpp_extension.
"""

import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile

import torch
from setuptools import setup
from torch.utils import cpp_extension
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
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX2",
        "-DCPU_CAPABILITY_AVX2",
    ],
    "csrc/cpu/acon_c_kernel_avx512.cpp": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
}
# The x86-64 baseline build of the kernels computes float64 in at::vec's
# portable Vectorized<double>, whose operations are loops over the lanes:
# GCC's early complete unrolling turns those short loops into scalar code
# before its vectorizer sees them; without that pass they become SSE2 code
# (float64 forward and backward about 2x faster on 14x14 maps, one thread,
# docs/design.md; float32, which computes in SSE2 registers there, gains
# nothing from it).
# GCC's own flag, given only where the compiler takes it.
BASELINE_KERNEL = "csrc/cpu/acon_c_kernel_default.cpp"
BASELINE_FLAGS = ["-fdisable-tree-cunrolli"]


def compiler_takes(flags):
    """Whether the C++ compiler that cpp_extension runs ($CXX, else c++)
    compiles a file with these flags."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int probe() { return 0; }\n")
        args = [*command, *flags, "-c", source, "-o", os.path.join(tmp, "probe.o")]
        try:
            return subprocess.run(args, capture_output=True).returncode == 0
        except OSError:  # no such compiler
            return False


# Each kernel file's extra flags in this build (recorded in _build_info.py).
KERNEL_FLAGS = dict(ISA_FLAGS) if X86_64 else {}
if X86_64 and compiler_takes(BASELINE_FLAGS):
    KERNEL_FLAGS[BASELINE_KERNEL] = BASELINE_FLAGS


CPU_SOURCES = rel(
    "csrc/*.cpp",
    "csrc/cpu/acon_c_cpu.cpp",
    "csrc/cpu/batch_norm_acon_c_cpu.cpp",
    "csrc/cpu/meta_acon_c_cpu.cpp",
    BASELINE_KERNEL,
)
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
                groups.setdefault(tuple(KERNEL_FLAGS.get(key, [])), []).append(source)
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


def find_cuda_home():
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH if set, else the first of the
    nvcc on PATH's install and /usr/local/cuda that has the runtime headers
    (an nvcc copied to /usr/local/bin would make torch guess /usr/local)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    on_path = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(on_path)))] if on_path else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def cuda_build_problem():
    """None when the CUDA kernels can be built, else why not (one short line)."""
    if torch.version.cuda is None:
        return "torch %s is a CPU-only build" % torch.__version__
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        return "could not read the version of %s" % nvcc
    if match.group(1) != torch.version.cuda.split(".")[0]:
        return "nvcc %s.%s does not match torch's CUDA %s" % (match.group(1), match.group(2), torch.version.cuda)
    # cpp_extension guessed its CUDA_HOME when it was imported.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    return None


# With no GPU visible torch cannot pick the target architectures itself.
# Hopper (H100/H200) as machine code, plus its PTX, which the driver compiles
# for newer GPUs. Each extra architecture adds about a minute to the build.
DEFAULT_CUDA_ARCHS = "9.0+PTX"


def default_cuda_archs():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print("acon_cuda: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST=%s" % DEFAULT_CUDA_ARCHS)


CXX_FLAGS = ["-O3", "-fopenmp"] + (["-DACON_CPU_X86_VARIANTS"] if X86_64 else [])
# -fmad=false: no multiply-add is fused unless the source says so (fma_of),
# so the GPU adds the sums exactly as the CPU emulation of its code does.
# ACON_PTXAS_VERBOSE=1 prints each kernel's registers, spills and stack.
NVCC_FLAGS = ["-O3", "-fmad=false"] + (["-Xptxas=-v"] if os.environ.get("ACON_PTXAS_VERBOSE") else [])
problem = cuda_build_problem()
if problem is None:
    default_cuda_archs()
    extension = CUDAExtension(
        "acon_cuda._C",
        CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
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


def base_version():
    """acon_cuda/_version.py's version, read without importing the package."""
    with open(os.path.join(ROOT, "acon_cuda", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def build_label(with_cuda):
    """The local version label of this build: torch's major.minor, and the
    CUDA version of the kernels (cpu without them), e.g. torch2.14.cu130."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return "torch%s.%s" % (major_minor, cuda)


def write_build_info(version, with_cuda):
    """acon_cuda/_build_info.py: what the extension is built against, which
    acon_cuda/__init__.py checks before it loads the extension."""
    with open(os.path.join(ROOT, "acon_cuda", "_build_info.py"), "w") as f:
        f.write(
            "# Written by setup.py at build time (not in git): what acon_cuda._C\n"
            "# was compiled against.\n"
            "VERSION = %r\n"
            % version
            + "TORCH_VERSION = %r\n" % torch.__version__
            + "CUDA_VERSION = %r\n" % (torch.version.cuda if with_cuda else None)
            + "CUDA_ARCHS = %r\n" % (os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None)
            + "CXX_FLAGS = %r\n" % CXX_FLAGS
            + "CPU_ISA_FLAGS = %r\n" % {os.path.basename(k): v for k, v in KERNEL_FLAGS.items()}
            + "NVCC_FLAGS = %r\n" % (NVCC_FLAGS if with_cuda else None)
        )


VERSION = "%s+%s" % (base_version(), build_label(problem is None))
write_build_info(VERSION, problem is None)

# Name, dependencies and the other metadata are in pyproject.toml.
setup(
    version=VERSION,
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtensionPerIsa},
)
