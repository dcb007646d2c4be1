"""Meta-ACON's small products: the CPU loops against ATen, in one run.

``python -m benchmarks.probes.small_products`` (a source checkout with the extension
built in place: ``python setup.py build_ext --inplace``) compiles a tiny
extension that calls ``acon_cuda::cpu::small_product`` from the built
library, and times it against ``torch.addmm`` (the forward's form: a
transposed weight, with a bias) and ``torch.mm`` (the backward's form) on
the generator's shapes. Its figures set ``kSmallProduct`` in
csrc/cpu/meta_acon_c_cpu.cpp. ATen's figures include a Python call each
(about as much as the C++ call ours goes through here).
"""

import glob
import os
import tempfile

import torch
from torch.utils import benchmark
from torch.utils.cpp_extension import load_inline

import acon_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(4, 64, 16), (32, 24, 16), (32, 48, 16), (32, 96, 16), (16, 256, 16), (32, 16, 96), (16, 16, 256)]

SOURCE = r"""
#include <torch/extension.h>
#include "cpu/meta_acon_c_cpu.h"
at::Tensor small_product(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return acon_cuda::cpu::small_product(a, b, bias.value_or(at::Tensor()));
}
"""


def load_small_product():
    here = os.path.dirname(acon_cuda.__file__)
    library = glob.glob(os.path.join(here, "_C*.so"))
    header = os.path.join(ROOT, "csrc", "cpu", "meta_acon_c_cpu.h")
    if not library or not os.path.exists(header):
        raise SystemExit("needs a source checkout with the extension built in place (setup.py build_ext --inplace)")
    return load_inline(
        "acon_small_product_bench",
        cpp_sources=[SOURCE],
        functions=["small_product"],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O3"],
        extra_ldflags=[library[0], f"-Wl,-rpath,{here}"],
        build_directory=tempfile.mkdtemp(prefix="acon_small_product_"),
    ).small_product


def median_us(call):
    timer = benchmark.Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median * 1e6


def main():
    ours = load_small_product()
    print(f"{'rows x inner x cols':<20} {'MACs':>7} {'fwd ours':>9} {'addmm':>7} {'bwd ours':>9} {'mm':>7}  (us)")
    for rows, inner, cols in SHAPES:
        a, bias = torch.randn(rows, inner), torch.randn(cols)
        weight_t = torch.randn(cols, inner).t()  # the forward's transposed weight
        b = torch.randn(inner, cols)  # the backward's contiguous rows
        torch.testing.assert_close(ours(a, weight_t, bias), torch.addmm(bias, a, weight_t))
        figures = [
            median_us(lambda: ours(a, weight_t, bias)),
            median_us(lambda: torch.addmm(bias, a, weight_t)),
            median_us(lambda: ours(a, b, None)),
            median_us(lambda: torch.mm(a, b)),
        ]
        print(f"{f'{rows}x{inner}x{cols}':<20} {rows * inner * cols:>7} " + " ".join(f"{f:>8.1f}" for f in figures))


if __name__ == "__main__":
    main()
