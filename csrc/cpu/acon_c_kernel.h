// Interface between the CPU op (acon_c_cpu.cpp) and its kernels, which are
// compiled once per instruction set (acon_c_kernel_{default,avx2,avx512}.cpp)
// from acon_c_kernel_impl.h and chosen at run time, as PyTorch does.
#pragma once

#include "../acon_c.h"
#include "isa.h"

namespace acon_cuda::cpu {

// Tables of per-channel values in opmath precision (float, or double for
// float64 x), each padded with zeros to `table_stride` entries so that vector
// loads past C stay in bounds: d = p1 - p2, p2, and bd = beta * d, which has
// one row per group (per sample for a per-sample beta).
struct AconCKernelArgs {
  ChannelLayout layout;
  at::ScalarType dtype;
  int64_t table_stride;
  const void* d;
  const void* p2;
  const void* bd;
  const void* x;       // dtype, contiguous in layout order
  const void* grad_y;  // backward only
  void* out;           // y (forward) or grad_x (backward)
  // Backward only, zero-initialised by the caller: sum_a = sum dy*x*h and
  // sum_b = sum dy*x per channel; sum_g = sum dy*(d*x)^2*S*(1-S) per group and
  // channel. See ACON_MATH.md.
  double* sum_a;
  double* sum_b;
  double* sum_g;
};

// Every table_stride is a multiple of this (the widest vector of any dtype).
constexpr int64_t kTableAlign = 64;

#define ACON_DECLARE_CPU_KERNELS(isa)                          \
  namespace isa {                                              \
  void acon_c_forward_kernel(const AconCKernelArgs& args);     \
  void acon_c_backward_kernel(const AconCKernelArgs& args);    \
  }

ACON_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef ACON_CPU_X86_VARIANTS
ACON_DECLARE_CPU_KERNELS(AVX2)
ACON_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef ACON_DECLARE_CPU_KERNELS

} // namespace acon_cuda::cpu
