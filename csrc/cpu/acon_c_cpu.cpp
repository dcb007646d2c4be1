// CPU implementations of the acon ops: argument checks, layout, parameter
// tables, and the choice of kernel build for this CPU.
#include "acon_c_kernel.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace acon_cuda::cpu {
namespace {

// One build of the CPU kernels.
struct CpuKernels {
  const char* isa;
  void (*forward)(const AconCKernelArgs&);
  void (*backward)(const AconCKernelArgs&);
};

// The build for PyTorch's own choice of CPU capability, which honours
// ATEN_CPU_CAPABILITY and what this CPU supports.
const CpuKernels& cpu_kernels() {
  static const CpuKernels chosen = [] {
#ifdef ACON_CPU_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return CpuKernels{"AVX512", AVX512::acon_c_forward_kernel, AVX512::acon_c_backward_kernel};
    }
    if (capability == "AVX2") {
      return CpuKernels{"AVX2", AVX2::acon_c_forward_kernel, AVX2::acon_c_backward_kernel};
    }
#endif
    return CpuKernels{"DEFAULT", DEFAULT::acon_c_forward_kernel, DEFAULT::acon_c_backward_kernel};
  }();
  return chosen;
}

std::string kernel_isa_name() {
  return cpu_kernels().isa;
}

// The ParamLines of AconCKernelArgs: C-sized. The CPU allocator aligns them
// to 64 bytes, so vector loads never straddle cache lines.
template <typename opmath_t>
at::Tensor build_param_lines(const at::Tensor& p1, const at::Tensor& p2, int64_t padded_channels) {
  const auto opmath = c10::CppTypeToScalarType<opmath_t>::value;
  const at::Tensor p1c = p1.reshape(-1).to(opmath).contiguous();
  const at::Tensor p2c = p2.reshape(-1).to(opmath).contiguous();
  const opmath_t* p1v = p1c.const_data_ptr<opmath_t>();
  const opmath_t* p2v = p2c.const_data_ptr<opmath_t>();
  at::Tensor lines = at::zeros({2 * padded_channels}, p1c.options());
  opmath_t* base = lines.mutable_data_ptr<opmath_t>();
  for (int64_t c = 0; c < p1c.numel(); ++c) {
    opmath_t* line = base + ParamLines<opmath_t>::index(c);
    line[0] = p1v[c] - p2v[c];
    line[ParamLines<opmath_t>::kLine] = p2v[c];
  }
  return lines;
}

// Runs `kernel` with x (and grad_y) in the layout of `out`, parameter tables
// built for x's dtype, and `out` written in place.
void launch(
    const at::Tensor& out, const at::Tensor& x, const at::Tensor& p1,
    const at::Tensor& p2, const at::Tensor& beta, int64_t cdim,
    const at::Tensor& grad_y, AconCKernelArgs& args,
    void (*kernel)(const AconCKernelArgs&)) {
  WorkTensors w = make_work_tensors(out, x, beta, cdim, grad_y);
  args.layout = w.layout;
  args.dtype = x.scalar_type();
  args.padded_channels = (w.layout.channels + kTableAlign - 1) / kTableAlign * kTableAlign;
  args.x = w.x.const_data_ptr();
  args.grad_y = grad_y.defined() ? w.grad_y.const_data_ptr() : nullptr;
  args.out = w.out.mutable_data_ptr();
  const bool is_double = x.scalar_type() == at::kDouble;
  const at::Tensor lines = is_double ? build_param_lines<double>(p1, p2, args.padded_channels)
                                     : build_param_lines<float>(p1, p2, args.padded_channels);
  // No copy for the usual float32 (float64) beta.
  const at::Tensor beta_opmath = beta.reshape(-1).to(is_double ? at::kDouble : at::kFloat).contiguous();
  args.params = lines.const_data_ptr();
  args.beta = beta_opmath.const_data_ptr();
  kernel(args);
  if (!w.out.is_same(out)) {
    out.copy_(w.out);
  }
}

at::Tensor acon_c_forward_cpu(
    const at::Tensor& x, const at::Tensor& p1, const at::Tensor& p2,
    const at::Tensor& beta, int64_t channel_dim) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim);
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    AconCKernelArgs args{};
    launch(y, x, p1, p2, beta, cdim, at::Tensor(), args, cpu_kernels().forward);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& p1,
    const at::Tensor& p2, const at::Tensor& beta, int64_t channel_dim) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y);
  const int64_t C = x.size(cdim);
  at::Tensor grad_x = at::empty_like(x);
  // A = sum dy*x*h, B = sum dy*x (per channel), G (per channel or per sample
  // and channel, as beta): dp1 = A, dp2 = B - A, dbeta = G.
  at::Tensor sums = at::zeros({2 * C + beta.numel()}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AconCKernelArgs args{};
    double* s = sums.mutable_data_ptr<double>();
    args.sum_a = s;
    args.sum_b = s + C;
    args.sum_g = s + 2 * C;
    launch(grad_x, x, p1, p2, beta, cdim, grad_y, args, cpu_kernels().backward);
  }
  auto [grad_p1, grad_p2, grad_beta] = parameter_grads_from_sums(sums, p1, p2, beta);
  return {grad_x, grad_p1, grad_p2, grad_beta};
}

} // namespace
} // namespace acon_cuda::cpu

TORCH_LIBRARY_FRAGMENT(acon, m) {
  // Which build of the CPU kernels runs here: "AVX512", "AVX2" or "DEFAULT".
  m.def("cpu_kernel_isa() -> str", &acon_cuda::cpu::kernel_isa_name);
}

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("acon_c_forward", &acon_cuda::cpu::acon_c_forward_cpu);
  m.impl("acon_c_backward", &acon_cuda::cpu::acon_c_backward_cpu);
}
