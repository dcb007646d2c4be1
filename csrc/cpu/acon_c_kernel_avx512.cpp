// AVX-512 build of the CPU kernels: setup.py compiles this file with
// PyTorch's AVX-512 flags (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -DCPU_CAPABILITY=AVX512 ...), and only on x86-64. Called only when
// at::get_cpu_capability() reports AVX512.
#include "acon_c_kernel_impl.h"
#include "batch_norm_acon_c_kernel_impl.h"
