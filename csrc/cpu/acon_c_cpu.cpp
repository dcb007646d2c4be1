// CPU implementations of the acon ops: argument checks, layout, parameter
// tables, and the choice of kernel build for this CPU.
#include "acon_c_kernel.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <c10/util/irange.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace acon_cuda::cpu {

const CpuKernels& cpu_kernels() {
  static const CpuKernels chosen = [] {
#ifdef ACON_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return AVX512::kernels("AVX512");
    }
    if (capability == "AVX2") {
      return AVX2::kernels("AVX2");
    }
#endif
    return DEFAULT::kernels("DEFAULT");
  }();
  return chosen;
}

namespace {

std::string kernel_isa_name() {
  return cpu_kernels().isa;
}

// Scratch slot of this file (the kernels use the others): the double sums.
constexpr int kSumsSlot = kScratchSlots - 1;

// Runs `kernel` with x (and grad_y) in the layout of `out` and `out`
// written in place; `out` undefined: a backward without grad_x (the layout of
// x then decides).
void launch(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    const at::Tensor& grad_y,
    AconCKernelArgs& args,
    void (*kernel)(const AconCKernelArgs&)) {
  const at::Tensor& like = out.defined() ? out : x.is_non_overlapping_and_dense() ? x : at::empty_like(x);
  WorkTensors w = make_work_tensors(like, x, beta, cdim, grad_y);
  args.layout = w.layout;
  args.dtype = x.scalar_type();
  args.padded_channels = (w.layout.channels + kTableAlign - 1) / kTableAlign * kTableAlign;
  args.x = w.x.const_data_ptr();
  args.grad_y = grad_y.defined() ? w.grad_y.const_data_ptr() : nullptr;
  args.out = out.defined() ? w.out.mutable_data_ptr() : nullptr;
  const at::ScalarType opmath = opmath_dtype(x);
  const at::Tensor p1o = values_in(p1, opmath);
  const at::Tensor p2o = values_in(p2, opmath);
  const at::Tensor betao = values_in(beta, opmath);
  args.p1 = p1o.const_data_ptr();
  args.p2 = p2o.const_data_ptr();
  args.beta = betao.const_data_ptr();
  kernel(args);
  if (out.defined() && !w.out.is_same(out)) {
    out.copy_(w.out);
  }
}

at::Tensor acon_c_forward_cpu(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim);
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    AconCKernelArgs args{};
    launch(y, x, p1, p2, beta, cdim, at::Tensor(), args, cpu_kernels().acon_c_forward);
  }
  return y;
}

// A parameter's gradient from the double sums: first[i] (minus second[i]),
// in the parameter's dtype and shape.
at::Tensor grad_from_sums(const at::Tensor& param, const double* first, const double* second = nullptr) {
  at::Tensor grad = at::empty(param.sizes(), param.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "acon_c_grad_from_sums", [&] {
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    for (const auto i : c10::irange(grad.numel())) {
      out[i] = static_cast<scalar_t>(second == nullptr ? first[i] : first[i] - second[i]);
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_cpu(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    std::array<bool, 2> output_mask) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y);
  const auto [want_x, want_params] = output_mask;
  const int64_t C = x.size(cdim);
  at::Tensor grad_x = want_x ? at::empty_like(x) : masked_out_grad(x);
  // A = sum dy*x*h, B = sum dy*x (per channel), G (per channel or per sample
  // and channel, as beta): dp1 = A, dp2 = B - A, dbeta = G. A per-sample
  // beta with one element per sample and channel (beta as large as x) has
  // nothing to sum: the kernel writes its gradient straight into a tensor
  // (AconCKernelArgs::grad_beta), a third of the traffic of double sums.
  const bool beta_rows = want_params && beta.numel() != C && beta.numel() == x.numel();
  const int64_t n_sums = want_params ? 2 * C + (beta_rows ? 0 : beta.numel()) : 0;
  double* sums = static_cast<double*>(thread_scratch_bytes(kSumsSlot, n_sums * static_cast<int64_t>(sizeof(double))));
  std::fill(sums, sums + n_sums, 0.0);
  at::Tensor grad_beta_rows = beta_rows ? at::empty(beta.sizes(), beta.options().dtype(opmath_dtype(x))) : at::Tensor();
  if (x.numel() > 0 && (want_x || want_params)) {
    AconCKernelArgs args{};
    if (want_params) {
      args.sum_a = sums;
      args.sum_b = sums + C;
      if (beta_rows) {
        args.grad_beta = grad_beta_rows.mutable_data_ptr();
      } else {
        args.sum_g = sums + 2 * C;
      }
    }
    launch(want_x ? grad_x : at::Tensor(), x, p1, p2, beta, cdim, grad_y, args, cpu_kernels().acon_c_backward);
  }
  if (!want_params) {
    return {grad_x, masked_out_grad(p1), masked_out_grad(p2), masked_out_grad(beta)};
  }
  return {
      grad_x,
      grad_from_sums(p1, sums),
      grad_from_sums(p2, sums + C, sums),
      beta_rows ? grad_beta_rows.to(beta.scalar_type()) : grad_from_sums(beta, sums + 2 * C)};
}

} // namespace

void* thread_scratch_bytes(int slot, int64_t bytes) {
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kScratchSlots);
  thread_local std::vector<std::byte> buffers[kScratchSlots];
  std::vector<std::byte>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < bytes + 64) {
    buffer.resize(bytes + 64);
  }
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + (64 - address % 64) % 64;
}

} // namespace acon_cuda::cpu

// cpu_kernel_isa takes no tensor, so no backend key dispatches it: a
// CompositeImplicitAutograd kernel also serves calls without tensors.
TORCH_LIBRARY_IMPL(acon, CompositeImplicitAutograd, m) {
  m.impl("cpu_kernel_isa", &acon_cuda::cpu::kernel_isa_name);
}

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("acon_c_forward", &acon_cuda::cpu::acon_c_forward_cpu);
  m.impl("acon_c_backward", &acon_cuda::cpu::acon_c_backward_cpu);
}
