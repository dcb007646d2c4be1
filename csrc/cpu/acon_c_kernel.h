// Interface between the CPU op (acon_c_cpu.cpp) and its kernels, which are
// compiled once per instruction set (acon_c_kernel_{default,avx2,avx512}.cpp)
// from acon_c_kernel_impl.h and chosen at run time, as PyTorch does. setup.py
// defines ACON_CPU_X86_VARIANTS where it builds the AVX2 and AVX-512 ones.
#pragma once

#include "../acon_c.h"

#include <array>

namespace acon_cuda::cpu {

// Per-channel arrays interleaved one cache line at a time: kRows values per
// channel ([row 0 line][row 1 line]... for each line of channels), so that a
// channels-innermost kernel reads one stream rather than kRows.
template <typename T, int kRows>
struct Lines {
  static constexpr int64_t kLine = 64 / sizeof(T);
  // Index of channel c's row-0 value; its row-k value is k * kLine further on.
  static constexpr int64_t index(int64_t c) {
    const auto u = static_cast<uint64_t>(c); // unsigned: shifts, not divisions
    return static_cast<int64_t>((u / kLine) * kRows * kLine + u % kLine);
  }
};

// d = p1 - p2 and p2 in opmath precision (float, or double for float64 x).
template <typename opmath_t>
using ParamLines = Lines<opmath_t, 2>;

struct AconCKernelArgs {
  ChannelLayout layout;
  at::ScalarType dtype;
  // Channels rounded up to kTableAlign: vector loads past C stay in bounds.
  int64_t padded_channels;
  // p1 and p2 in opmath precision, contiguous, C values each; the kernels
  // build their ParamLines (d = p1 - p2, p2) from them.
  const void* p1;
  const void* p2;
  const void* params; // the ParamLines: set by the kernel entry, not the caller
  // beta in opmath precision, contiguous, C values per group (one group, or
  // one per sample), not padded. Kernels take beta * d as the reference does.
  const void* beta;
  const void* x;      // dtype, contiguous in layout order
  const void* grad_y; // backward only
  // y (forward) or grad_x (backward); null in a backward that only wants the
  // parameter sums.
  void* out;
  // Backward only, zero-initialised by the caller: sum_a = sum dy*x*h and
  // sum_b = sum dy*x per channel; sum_g = sum dy*(d*x)^2*S*(1-S) per group and
  // channel. See docs/math.md. All null in a backward that only wants grad_x.
  double* sum_a;
  double* sum_b;
  double* sum_g;
  // Backward with a per-sample beta whose samples are single rows of
  // channels (outer == inner == 1, such as (N, C) features): beta's gradient
  // has no sum to take, so the kernel writes it here, in opmath precision,
  // instead of into sum_g (which is null then). Null otherwise.
  void* grad_beta;
};

// Grow-only scratch memory of the calling thread, 64-byte aligned, `slot`
// telling apart buffers that are live at the same time (kScratchSlots of
// them): nothing is allocated per call (repeated large allocations make the
// system allocator hand pages back and fault them in again). Defined once,
// in acon_c_cpu.cpp, for every kernel build.
constexpr int kScratchSlots = 4;
void* thread_scratch_bytes(int slot, int64_t bytes);

// padded_channels is a multiple of this (the widest vector of any dtype).
constexpr int64_t kTableAlign = 64;

// The kernels of BatchNorm fused with ACON-C (batch_norm_acon_c_kernel_impl.h),
// which take per-channel values computed by their op
// (batch_norm_acon_c_cpu.cpp) rather than parameters.
struct NormKernelArgs {
  // groups > 1 (one per sample) for Meta-ACON after BatchNorm: its beta, and
  // the sums its generator needs, are per sample and channel.
  ChannelLayout layout;
  at::ScalarType dtype;
  int64_t padded_channels; // as in AconCKernelArgs
  // The kernel's per-channel rows, C doubles each, in the order its element
  // operation reads them; a row whose bit is set in grouped_rows holds
  // groups * C doubles (group-major), one set of values per group.
  std::array<const double*, 8> values{};
  uint32_t grouped_rows = 0;
  const void* x;
  const void* grad_y; // backward only
  void* out;          // y, grad_x, or dz (where the backward's sums pass stores it)
};

// One build of the CPU kernels: the acon ops' and the fused BatchNorm's.
// The sums kernels write kSums rows of C doubles per group (group-major; see
// their element operations); batch_norm_acon_c_grad_sums also stores
// dz * values[6] into out where out is not null.
struct CpuKernels {
  const char* isa;
  void (*acon_c_forward)(const AconCKernelArgs&);
  void (*acon_c_backward)(const AconCKernelArgs&);
  void (*batch_norm_moments)(const NormKernelArgs&, double* sums);
  void (*batch_norm_acon_c_forward)(const NormKernelArgs&);
  void (*batch_norm_acon_c_grad_sums)(const NormKernelArgs&, double* sums);
  void (*batch_norm_grad_from_dz)(const NormKernelArgs&);
};

// The build for PyTorch's own choice of CPU capability, which honours
// ATEN_CPU_CAPABILITY and what this CPU supports (acon_c_cpu.cpp).
const CpuKernels& cpu_kernels();

#define ACON_DECLARE_CPU_KERNELS(isa)                                                \
  namespace isa {                                                                    \
  void acon_c_forward_kernel(const AconCKernelArgs& args);                           \
  void acon_c_backward_kernel(const AconCKernelArgs& args);                          \
  void batch_norm_moments_kernel(const NormKernelArgs& args, double* sums);          \
  void batch_norm_acon_c_forward_kernel(const NormKernelArgs& args);                 \
  void batch_norm_acon_c_grad_sums_kernel(const NormKernelArgs& args, double* sums); \
  void batch_norm_grad_from_dz_kernel(const NormKernelArgs& args);                   \
  inline CpuKernels kernels(const char* name) {                                      \
    return CpuKernels{                                                               \
        name,                                                                        \
        acon_c_forward_kernel,                                                       \
        acon_c_backward_kernel,                                                      \
        batch_norm_moments_kernel,                                                   \
        batch_norm_acon_c_forward_kernel,                                            \
        batch_norm_acon_c_grad_sums_kernel,                                          \
        batch_norm_grad_from_dz_kernel};                                             \
  }                                                                                  \
  }

ACON_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef ACON_CPU_X86_VARIANTS
ACON_DECLARE_CPU_KERNELS(AVX2)
ACON_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef ACON_DECLARE_CPU_KERNELS

} // namespace acon_cuda::cpu
