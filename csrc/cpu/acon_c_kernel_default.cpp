// Baseline build of the CPU kernels (at::vec's portable Vectorized), used on
// CPUs without AVX2 and when ATEN_CPU_CAPABILITY=default.
// setup.py links this object before the AVX2/AVX-512 ones, so the linker keeps
// this file's copies of inline functions that several builds instantiate
// (PyTorch's headers define some outside the per-instruction-set namespace).
#define CPU_CAPABILITY DEFAULT
#include "acon_c_kernel_impl.h"
#include "batch_norm_acon_c_kernel_impl.h"
