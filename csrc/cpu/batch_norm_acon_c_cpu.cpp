// CPU implementation of BatchNorm fused with ACON-C (acon_cuda/batch_norm.py
// wraps it; docs/batch_norm.md has the formulas). The forward is a
// statistics pass and an element-wise pass; the backward a sums pass that
// recomputes the BatchNorm's output from x and the saved per-channel
// statistics and stores dz in grad_x, then an element-wise pass that turns
// dz into grad_x in place (with batch statistics only). Per-channel work is done here in double;
// the kernels (batch_norm_acon_c_kernel_impl.h) do the per-element work.
#include "acon_c_kernel.h"

#include <ATen/Dispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace acon_cuda::cpu {
namespace {

using Doubles = std::vector<double>;

// t's C values in double (t undefined: `fill` each). Per-channel tensors
// are read and written in place: a tensor op per vector would cost more
// than the arithmetic, at every BatchNorm of a model.
Doubles doubles_of(const at::Tensor& t, int64_t C, double fill) {
  if (!t.defined()) {
    return Doubles(C, fill);
  }
  const at::Tensor flat = t.is_contiguous() ? t : t.contiguous();
  Doubles out(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "batch_norm_acon_c_read", [&] {
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    for (const auto c : c10::irange(C)) {
      out[c] = static_cast<double>(p[c]);
    }
  });
  return out;
}

// Writes values into t (C elements, any float dtype), rounded to its dtype.
void write_doubles(const at::Tensor& t, const Doubles& values) {
  at::Tensor flat = t.is_contiguous() ? t : at::empty(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "batch_norm_acon_c_write", [&] {
    scalar_t* p = flat.mutable_data_ptr<scalar_t>();
    for (const auto c : c10::irange(static_cast<int64_t>(values.size()))) {
      p[c] = static_cast<scalar_t>(values[c]);
    }
  });
  if (!flat.is_same(t)) {
    t.copy_(flat);
  }
}

// v rounded to the kernels' opmath precision (float, or double for float64 x).
double rounded(double v, at::ScalarType opmath) {
  return opmath == at::kFloat ? static_cast<double>(static_cast<float>(v)) : v;
}

// values rounded to opmath precision in place, and a tensor of them: the
// saved statistics, so that the forward and backward see the same numbers.
at::Tensor opmath_tensor(Doubles& values, const at::Tensor& x) {
  const at::ScalarType opmath = opmath_dtype(x);
  for (double& v : values) {
    v = rounded(v, opmath);
  }
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, x.options().dtype(opmath));
  write_doubles(t, values);
  return t;
}

void check_channel_vector(const char* name, const at::Tensor& t, const at::Tensor& x, int64_t C) {
  if (!t.defined()) {
    return;
  }
  TORCH_CHECK(
      t.device() == x.device(), "batch_norm_acon_c: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()),
      "batch_norm_acon_c: ",
      name,
      " must be a float tensor, got ",
      t.scalar_type());
  TORCH_CHECK_VALUE(
      t.numel() == C,
      "batch_norm_acon_c: ",
      name,
      " must have one value per channel (",
      C,
      ", x.shape[1]), got shape ",
      t.sizes());
}

// The checks of both ops: those of acon_c on channel axis 1 with a
// per-channel beta, and the BatchNorm's per-channel tensors.
int64_t check_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> channel_vectors,
    const at::Tensor& grad_y = at::Tensor()) {
  check_acon_c_args(x, p1, p2, beta, 1, grad_y);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(
      beta.numel() == C,
      "batch_norm_acon_c: beta must have one value per channel (",
      C,
      "), got shape ",
      beta.sizes(),
      "; a per-sample beta (Meta-ACON) is not fused");
  for (const auto& [name, t] : channel_vectors) {
    check_channel_vector(name, *t, x, C);
  }
  return C;
}

// The values every op reads: d = p1 - p2, p2 and bd = beta * d (ACON-C's),
// mean and scale = weight * invstd and shift = bias (the BatchNorm's).
struct ChannelValues {
  Doubles mean, scale, shift, d, p2, bd;
  ChannelValues(
      const Doubles& mean_,
      const Doubles& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias,
      const at::Tensor& p1_t,
      const at::Tensor& p2_t,
      const at::Tensor& beta_t,
      at::ScalarType opmath)
      : mean(mean_), shift(doubles_of(bias, mean_.size(), 0.0)), p2(doubles_of(p2_t, mean_.size(), 0.0)) {
    const int64_t C = mean.size();
    const Doubles w = doubles_of(weight, C, 1.0), p1 = doubles_of(p1_t, C, 0.0), beta = doubles_of(beta_t, C, 0.0);
    // Rounded as the opmath arithmetic of the reference rounds them.
    scale.resize(C);
    d.resize(C);
    bd.resize(C);
    for (const auto c : c10::irange(C)) {
      scale[c] = rounded(w[c] * invstd[c], opmath);
      d[c] = rounded(p1[c] - p2[c], opmath);
      bd[c] = rounded(beta[c] * d[c], opmath);
    }
  }
  void set_rows(NormKernelArgs& args) const {
    args.values = {mean.data(), scale.data(), shift.data(), d.data(), p2.data(), bd.data(), nullptr, nullptr};
  }
};

// The kernels' arguments for x (and grad_y) in the layout of `like`.
NormKernelArgs kernel_args(const WorkTensors& w, const at::Tensor& x) {
  NormKernelArgs args{};
  args.layout = w.layout;
  args.dtype = x.scalar_type();
  args.padded_channels = (w.layout.channels + kTableAlign - 1) / kTableAlign * kTableAlign;
  args.x = w.x.const_data_ptr();
  args.grad_y = w.grad_y.defined() ? w.grad_y.const_data_ptr() : nullptr;
  args.out = w.out.mutable_data_ptr();
  return args;
}

// The first value of each channel in memory order (group 0, outer 0,
// inner 0): the statistics pass's shift.
Doubles first_values(const NormKernelArgs& args) {
  const ChannelLayout& lay = args.layout;
  Doubles first(lay.channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "batch_norm_acon_c_first", [&] {
    const auto* x = static_cast<const scalar_t*>(args.x);
    for (const auto c : c10::irange(lay.channels)) {
      first[c] = static_cast<double>(x[c * lay.inner]);
    }
  });
  return first;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_acon_c_forward_cpu(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight_opt,
    const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    bool training,
    double momentum,
    double eps) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
  const at::Tensor running_mean = running_mean_opt.value_or(at::Tensor());
  const at::Tensor running_var = running_var_opt.value_or(at::Tensor());
  const int64_t C = check_args(
      x,
      p1,
      p2,
      beta,
      {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean}, {"running_var", &running_var}});
  TORCH_CHECK_VALUE(
      training || (running_mean.defined() && running_var.defined()),
      "batch_norm_acon_c: running_mean and running_var are needed without batch statistics (training=False)");
  const int64_t M = x.numel() / std::max<int64_t>(C, 1); // values per channel
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) { // as nn.BatchNorm: nothing normalised, running statistics kept
    return {y, at::zeros({C}, x.options().dtype(opmath_dtype(x))), at::ones({C}, x.options().dtype(opmath_dtype(x)))};
  }
  const WorkTensors w = make_work_tensors(y, x, beta, 1);
  NormKernelArgs args = kernel_args(w, x);
  const CpuKernels& kernels = cpu_kernels();
  Doubles mean(C), invstd(C);
  if (training) {
    TORCH_CHECK_VALUE(
        M > 1, "batch_norm_acon_c: expected more than 1 value per channel when training, got input size ", x.sizes());
    const Doubles shift = first_values(args);
    Doubles sums(2 * C);
    NormKernelArgs moments = args;
    moments.values[0] = shift.data();
    moments.out = nullptr; // sums only
    kernels.batch_norm_moments(moments, sums.data());
    Doubles var(C);
    for (const auto c : c10::irange(C)) {
      const double offset = sums[c] / M;
      mean[c] = shift[c] + offset;
      var[c] = std::max(sums[C + c] / M - offset * offset, 0.0);
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    }
    if (running_mean.defined()) {
      Doubles rm = doubles_of(running_mean, C, 0.0);
      for (const auto c : c10::irange(C)) {
        rm[c] = (1.0 - momentum) * rm[c] + momentum * mean[c];
      }
      write_doubles(running_mean, rm);
    }
    if (running_var.defined()) {
      Doubles rv = doubles_of(running_var, C, 0.0);
      for (const auto c : c10::irange(C)) {
        rv[c] = (1.0 - momentum) * rv[c] + momentum * var[c] * M / (M - 1);
      }
      write_doubles(running_var, rv);
    }
  } else {
    mean = doubles_of(running_mean, C, 0.0);
    const Doubles var = doubles_of(running_var, C, 0.0);
    for (const auto c : c10::irange(C)) {
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    }
  }
  at::Tensor save_mean = opmath_tensor(mean, x), save_invstd = opmath_tensor(invstd, x);
  const ChannelValues values(mean, invstd, weight, bias, p1, p2, beta, opmath_dtype(x));
  values.set_rows(args);
  kernels.batch_norm_acon_c_forward(args);
  if (!w.out.is_same(y)) {
    y.copy_(w.out);
  }
  return {y, save_mean, save_invstd};
}

// A gradient of C values from doubles, in param's dtype and shape.
at::Tensor channel_grad(const at::Tensor& param, const Doubles& values) {
  at::Tensor grad = at::empty(param.sizes(), param.options());
  write_doubles(grad, values);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_acon_c_backward_cpu(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight_opt,
    const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    bool training,
    std::array<bool, 3> output_mask) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
  const int64_t C = check_args(
      x,
      p1,
      p2,
      beta,
      {{"weight", &weight}, {"bias", &bias}, {"save_mean", &save_mean}, {"save_invstd", &save_invstd}},
      grad_y);
  const auto [want_x, want_norm, want_acon] = output_mask;
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  at::Tensor grad_x = want_x ? at::empty_like(x) : masked_out_grad(x);
  // A = sum dy*z*h, B = sum dy*z, G = sum dy*(d*z)^2*S*(1-S) (ACON-C's, in
  // z), Z = sum dz and X = sum dz * (x - mean).
  Doubles sums(5 * C, 0.0);
  const Doubles mean = doubles_of(save_mean, C, 0.0), invstd = doubles_of(save_invstd, C, 0.0);
  const ChannelValues values(mean, invstd, weight, bias, p1, p2, beta, opmath_dtype(x));
  if (x.numel() > 0 && (want_x || want_norm || want_acon)) {
    // Without grad_x, x's own layout decides (as in the acon backward).
    const at::Tensor like = want_x ? grad_x : x.is_non_overlapping_and_dense() ? x : at::empty_like(x);
    const WorkTensors w = make_work_tensors(like, x, beta, 1, grad_y);
    NormKernelArgs args = kernel_args(w, x);
    if (!want_x) {
      args.out = nullptr;
    }
    // The first pass stores dz * factor: grad_x itself without batch
    // statistics, dz with them (the second pass needs the sums first).
    const Doubles factor = training ? Doubles(C, 1.0) : values.scale;
    values.set_rows(args);
    args.values[6] = factor.data();
    const CpuKernels& kernels = cpu_kernels();
    kernels.batch_norm_acon_c_grad_sums(args, sums.data());
    if (want_x && training) { // the batch statistics' own gradient
      Doubles e(C), f(C);
      for (const auto c : c10::irange(C)) {
        e[c] = -values.scale[c] * invstd[c] * invstd[c] * sums[4 * C + c] / M;
        f[c] = -values.scale[c] * sums[3 * C + c] / M;
      }
      args.values = {values.mean.data(), values.scale.data(), e.data(), f.data()};
      args.grad_y = args.out; // dz, replaced by grad_x element by element
      kernels.batch_norm_grad_from_dz(args);
    }
    if (want_x && !w.out.is_same(grad_x)) {
      grad_x.copy_(w.out);
    }
  }
  const auto part = [&](int k) { return Doubles(sums.begin() + k * C, sums.begin() + (k + 1) * C); };
  at::Tensor grad_weight = masked_out_grad(x), grad_bias = masked_out_grad(x);
  if (want_norm && weight.defined()) {
    Doubles g = part(4);
    for (const auto c : c10::irange(C)) {
      g[c] *= invstd[c];
    }
    grad_weight = channel_grad(weight, g);
  }
  if (want_norm && bias.defined()) {
    grad_bias = channel_grad(bias, part(3));
  }
  if (!want_acon) {
    return {grad_x, grad_weight, grad_bias, masked_out_grad(p1), masked_out_grad(p2), masked_out_grad(beta)};
  }
  const Doubles a = part(0), b = part(1);
  Doubles b_minus_a(C);
  for (const auto c : c10::irange(C)) {
    b_minus_a[c] = b[c] - a[c];
  }
  return {
      grad_x, grad_weight, grad_bias, channel_grad(p1, a), channel_grad(p2, b_minus_a), channel_grad(beta, part(2))};
}

} // namespace
} // namespace acon_cuda::cpu

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("batch_norm_acon_c_forward", &acon_cuda::cpu::batch_norm_acon_c_forward_cpu);
  m.impl("batch_norm_acon_c_backward", &acon_cuda::cpu::batch_norm_acon_c_backward_cpu);
}
