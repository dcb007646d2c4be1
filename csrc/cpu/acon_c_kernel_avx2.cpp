// AVX2 build of the CPU kernels: setup.py compiles this file with PyTorch's
// AVX2 flags (-mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 ...), and only on
// x86-64. Called only when at::get_cpu_capability() reports AVX2.
#include "acon_c_kernel_impl.h"
#include "batch_norm_acon_c_kernel_impl.h"
