// CPU implementation of BatchNorm fused with ACON-C (acon_cuda/batch_norm.py
// wraps it; docs/batch_norm.md has the formulas). The forward is a
// statistics pass and an element-wise pass; the backward a sums pass that
// recomputes the BatchNorm's output from x and the saved per-channel
// statistics and stores dz in grad_x, then an element-wise pass that turns
// dz into grad_x in place (with batch statistics, or a per-sample beta).
// Per-channel work is done here in double; the kernels
// (batch_norm_acon_c_kernel_impl.h) do the per-element work. With a beta
// generated per sample (Meta-ACON, batch_norm_acon_c_cpu.h) the passes run
// per sample: the statistics pass also gives each sample's means, and the
// sums pass beta's gradient per sample, between which the generator runs.
#include "batch_norm_acon_c_cpu.h"

#include "acon_c_kernel.h"

#include <ATen/Dispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
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

void check_channel_vectors(
    const at::Tensor& x,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> channel_vectors) {
  for (const auto& [name, t] : channel_vectors) {
    check_channel_vector(name, *t, x, x.size(1));
  }
}

// beta as the ops take it: one value per channel.
void check_channel_beta(const at::Tensor& x, const at::Tensor& beta) {
  TORCH_CHECK_VALUE(
      beta.numel() == x.size(1),
      "batch_norm_acon_c: beta must have one value per channel (",
      x.size(1),
      "), got shape ",
      beta.sizes(),
      "; Meta-ACON's per-sample beta is fused by fusing a MetaAconC module (fuse_batchnorm), whose op generates "
      "it between the passes");
}

// The values every op reads: d = p1 - p2, p2 and bd = beta * d (ACON-C's),
// mean and scale = weight * invstd and shift = bias (the BatchNorm's). bd has
// beta's size: C values, or N * C for a per-sample beta.
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
    const Doubles w = doubles_of(weight, C, 1.0), p1 = doubles_of(p1_t, C, 0.0);
    const Doubles beta = doubles_of(beta_t, beta_t.numel(), 0.0);
    // Rounded as the opmath arithmetic of the reference rounds them.
    scale.resize(C);
    d.resize(C);
    for (const auto c : c10::irange(C)) {
      scale[c] = rounded(w[c] * invstd[c], opmath);
      d[c] = rounded(p1[c] - p2[c], opmath);
    }
    bd.resize(beta.size());
    for (const auto i : c10::irange(static_cast<int64_t>(beta.size()))) {
      bd[i] = rounded(beta[i] * d[i % C], opmath);
    }
  }
  void set_rows(NormKernelArgs& args) const {
    args.values = {mean.data(), scale.data(), shift.data(), d.data(), p2.data(), bd.data(), nullptr, nullptr};
    args.grouped_rows = bd.size() > d.size() ? 1u << 5 : 0u;
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

// values[g * stride + k * C + c] summed over g: per-channel totals of
// per-group sums, in group order.
Doubles group_totals(const Doubles& values, int64_t groups, int64_t stride, int64_t k, int64_t C) {
  Doubles total(C, 0.0);
  for (const auto g : c10::irange(groups)) {
    for (const auto c : c10::irange(C)) {
      total[c] += values[g * stride + k * C + c];
    }
  }
  return total;
}

// The ops' outputs, (y, save_mean, save_invstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_acon_c_forward_cpu(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    bool training,
    double momentum,
    double eps) {
  const NormArgs norm{
      weight.value_or(at::Tensor()),
      bias.value_or(at::Tensor()),
      running_mean.value_or(at::Tensor()),
      running_var.value_or(at::Tensor()),
      training,
      momentum,
      eps};
  check_batch_norm_acon_c_args(x, p1, p2, beta, norm);
  const NormAconCForward out = batch_norm_acon_c_forward(x, norm, p1, p2, beta);
  return {out.y, out.save_mean, out.save_invstd};
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
  check_acon_c_args(x, p1, p2, beta, 1, grad_y);
  check_channel_beta(x, beta);
  check_channel_vectors(
      x, {{"weight", &weight}, {"bias", &bias}, {"save_mean", &save_mean}, {"save_invstd", &save_invstd}});
  return batch_norm_acon_c_backward(
      grad_y, x, weight, bias, save_mean, save_invstd, p1, p2, beta, training, output_mask);
}

} // namespace

void check_batch_norm_acon_c_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    const NormArgs& norm) {
  check_acon_c_args(x, p1, p2, beta, 1);
  if (beta.defined()) {
    check_channel_beta(x, beta);
  }
  check_channel_vectors(
      x,
      {{"weight", &norm.weight},
       {"bias", &norm.bias},
       {"running_mean", &norm.running_mean},
       {"running_var", &norm.running_var}});
  TORCH_CHECK_VALUE(
      norm.training || (norm.running_mean.defined() && norm.running_var.defined()),
      "batch_norm_acon_c: running_mean and running_var are needed without batch statistics (training=False)");
  TORCH_CHECK_VALUE(
      !norm.training || x.numel() == 0 || x.numel() > x.size(1),
      "batch_norm_acon_c: expected more than 1 value per channel when training, got input size ",
      x.sizes());
}

NormAconCForward batch_norm_acon_c_forward(
    const at::Tensor& x,
    const NormArgs& norm,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    const BetaFromMeans& beta_from_means) {
  const int64_t C = x.size(1);
  const bool per_sample = static_cast<bool>(beta_from_means);
  const int64_t M = x.numel() / std::max<int64_t>(C, 1); // values per channel
  const at::ScalarType opmath = opmath_dtype(x);
  NormAconCForward out;
  out.y = at::empty_like(x);
  if (x.numel() == 0) { // as nn.BatchNorm: nothing normalised, running statistics kept
    TORCH_CHECK(!per_sample, "batch_norm_acon_c: a generated beta needs a non-empty x");
    out.save_mean = at::zeros({C}, x.options().dtype(opmath));
    out.save_invstd = at::ones({C}, x.options().dtype(opmath));
    return out;
  }
  const WorkTensors w = make_work_tensors(out.y, x, per_sample, 1);
  NormKernelArgs args = kernel_args(w, x);
  const int64_t G = args.layout.groups; // the batch with a per-sample beta, else 1
  const CpuKernels& kernels = cpu_kernels();
  Doubles mean(C), invstd(C), shift, sums;
  // Batch statistics need the statistics pass; a generated beta needs its
  // per-sample sums (of x - shift) in any mode.
  if (norm.training || per_sample) {
    shift = first_values(args);
    sums.resize(G * 2 * C);
    NormKernelArgs moments = args;
    moments.values[0] = shift.data();
    moments.out = nullptr; // sums only
    kernels.batch_norm_moments(moments, sums.data());
  }
  if (norm.training) { // M > 1: check_batch_norm_acon_c_args
    const Doubles su = group_totals(sums, G, 2 * C, 0, C), su2 = group_totals(sums, G, 2 * C, 1, C);
    Doubles var(C);
    for (const auto c : c10::irange(C)) {
      const double offset = su[c] / M;
      mean[c] = shift[c] + offset;
      var[c] = std::max(su2[c] / M - offset * offset, 0.0);
      invstd[c] = 1.0 / std::sqrt(var[c] + norm.eps);
    }
    if (norm.running_mean.defined()) {
      Doubles rm = doubles_of(norm.running_mean, C, 0.0);
      for (const auto c : c10::irange(C)) {
        rm[c] = (1.0 - norm.momentum) * rm[c] + norm.momentum * mean[c];
      }
      write_doubles(norm.running_mean, rm);
    }
    if (norm.running_var.defined()) {
      Doubles rv = doubles_of(norm.running_var, C, 0.0);
      for (const auto c : c10::irange(C)) {
        rv[c] = (1.0 - norm.momentum) * rv[c] + norm.momentum * var[c] * M / (M - 1);
      }
      write_doubles(norm.running_var, rv);
    }
  } else {
    mean = doubles_of(norm.running_mean, C, 0.0);
    const Doubles var = doubles_of(norm.running_var, C, 0.0);
    for (const auto c : c10::irange(C)) {
      invstd[c] = 1.0 / std::sqrt(var[c] + norm.eps);
    }
  }
  out.save_mean = opmath_tensor(mean, x);
  out.save_invstd = opmath_tensor(invstd, x);
  out.beta = beta;
  if (per_sample) {
    // The BatchNorm output's mean over sample g's map: scale * (its mean of
    // x - mean) + shift, from the statistics pass's per-sample sums.
    const double count = static_cast<double>(M / G);
    const Doubles weight = doubles_of(norm.weight, C, 1.0), bias = doubles_of(norm.bias, C, 0.0);
    Doubles offsets(G * C), means(G * C);
    for (const auto g : c10::irange(G)) {
      for (const auto c : c10::irange(C)) {
        const int64_t i = g * C + c;
        offsets[i] = shift[c] + sums[g * 2 * C + c] / count - mean[c];
        means[i] = weight[c] * invstd[c] * offsets[i] + bias[c];
      }
    }
    at::Tensor means_t = at::empty({G, C}, x.options());
    write_doubles(means_t, means);
    out.sample_offsets = at::empty({G, C}, x.options().dtype(at::kDouble));
    write_doubles(out.sample_offsets, offsets);
    out.beta = beta_from_means(means_t);
    TORCH_CHECK(
        out.beta.numel() == G * C && at::isFloatingType(out.beta.scalar_type()),
        "batch_norm_acon_c: the generated beta must hold (N, C) float values, got ",
        out.beta.sizes());
  }
  const ChannelValues values(mean, invstd, norm.weight, norm.bias, p1, p2, out.beta, opmath);
  values.set_rows(args);
  kernels.batch_norm_acon_c_forward(args);
  if (!w.out.is_same(out.y)) {
    out.y.copy_(w.out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_acon_c_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    bool training,
    std::array<bool, 3> output_mask,
    const at::Tensor& sample_offsets,
    const MeansGradFromBetaGrad& means_grad) {
  const int64_t C = x.size(1);
  const bool per_sample = static_cast<bool>(means_grad);
  const auto [want_x, want_norm, want_acon] = output_mask;
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  at::Tensor grad_x = want_x ? at::empty_like(x) : masked_out_grad(x);
  const Doubles mean = doubles_of(save_mean, C, 0.0), invstd = doubles_of(save_invstd, C, 0.0);
  const ChannelValues values(mean, invstd, weight, bias, p1, p2, beta, opmath_dtype(x));
  // Per group (sample, with a per-sample beta) and channel: A = sum dy*z*h,
  // B = sum dy*z, G = sum dy*(d*z)^2*S*(1-S) (ACON-C's, in z), Z = sum dz
  // and X = sum dz * (x - mean).
  int64_t G = 1;
  Doubles sums;
  std::optional<WorkTensors> w;
  NormKernelArgs args{};
  const CpuKernels& kernels = cpu_kernels();
  if (x.numel() > 0 && (want_x || want_norm || want_acon || per_sample)) {
    // Without grad_x, x's own layout decides (as in the acon backward).
    const at::Tensor like = want_x ? grad_x : x.is_non_overlapping_and_dense() ? x : at::empty_like(x);
    w = make_work_tensors(like, x, per_sample, 1, grad_y);
    args = kernel_args(*w, x);
    if (!want_x) {
      args.out = nullptr;
    }
    G = args.layout.groups;
    sums.assign(G * 5 * C, 0.0);
    // The first pass stores dz * factor: grad_x itself where nothing else is
    // added (no batch statistics, no means' gradient), dz otherwise (the
    // second pass needs the sums first).
    const bool second_pass = training || per_sample;
    const Doubles factor = second_pass ? Doubles(C, 1.0) : values.scale;
    values.set_rows(args);
    args.values[6] = factor.data();
    kernels.batch_norm_acon_c_grad_sums(args, sums.data());
  } else {
    sums.assign(5 * C, 0.0);
  }
  const auto total = [&](int k) { return group_totals(sums, G, 5 * C, k, C); };
  Doubles sum_dz = total(3), sum_dz_xc = total(4);
  // The means' gradient per sample and channel (zero without one): the mean
  // of z over sample g's map adds dm / count to each of its dz.
  Doubles dm;
  at::Tensor grad_beta;
  if (per_sample) {
    Doubles g_sums(G * C);
    for (const auto g : c10::irange(G)) {
      std::copy_n(sums.begin() + g * 5 * C + 2 * C, C, g_sums.begin() + g * C);
    }
    grad_beta = at::empty({G, C}, beta.options());
    write_doubles(grad_beta, g_sums);
    const at::Tensor dm_t = means_grad(grad_beta);
    if (dm_t.defined()) {
      TORCH_CHECK(dm_t.numel() == G * C, "batch_norm_acon_c: the means' gradient must have (N, C) values");
      dm = doubles_of(dm_t, G * C, 0.0);
      const Doubles offsets = doubles_of(sample_offsets, G * C, 0.0);
      for (const auto g : c10::irange(G)) {
        for (const auto c : c10::irange(C)) {
          sum_dz[c] += dm[g * C + c];
          sum_dz_xc[c] += dm[g * C + c] * offsets[g * C + c];
        }
      }
    }
  }
  if (want_x && w && (training || per_sample)) {
    // grad_x = scale * dz + e * (x - mean) + f: e and f fold in the batch
    // statistics' own gradient, f (per sample) the means' too.
    const double count = static_cast<double>(M / G);
    Doubles e(C, 0.0), f(per_sample ? G * C : C, 0.0);
    for (const auto i : c10::irange(static_cast<int64_t>(f.size()))) {
      const int64_t c = i % C;
      if (training) {
        e[c] = -values.scale[c] * invstd[c] * invstd[c] * sum_dz_xc[c] / M;
        f[i] = -values.scale[c] * sum_dz[c] / M;
      }
      if (!dm.empty()) {
        f[i] += values.scale[c] * dm[i] / count;
      }
    }
    args.values = {values.mean.data(), values.scale.data(), e.data(), f.data()};
    args.grouped_rows = per_sample ? 1u << 3 : 0u;
    args.grad_y = args.out; // dz, replaced by grad_x element by element
    kernels.batch_norm_grad_from_dz(args);
  }
  if (want_x && w && !w->out.is_same(grad_x)) {
    grad_x.copy_(w->out);
  }
  at::Tensor grad_weight = masked_out_grad(x), grad_bias = masked_out_grad(x);
  if (want_norm && weight.defined()) {
    for (const auto c : c10::irange(C)) {
      sum_dz_xc[c] *= invstd[c];
    }
    grad_weight = channel_grad(weight, sum_dz_xc);
  }
  if (want_norm && bias.defined()) {
    grad_bias = channel_grad(bias, sum_dz);
  }
  if (!want_acon) {
    return {grad_x, grad_weight, grad_bias, masked_out_grad(p1), masked_out_grad(p2), masked_out_grad(beta)};
  }
  const Doubles a = total(0), b = total(1);
  Doubles b_minus_a(C);
  for (const auto c : c10::irange(C)) {
    b_minus_a[c] = b[c] - a[c];
  }
  if (!per_sample) {
    grad_beta = channel_grad(beta, total(2));
  }
  return {grad_x, grad_weight, grad_bias, channel_grad(p1, a), channel_grad(p2, b_minus_a), grad_beta};
}

} // namespace acon_cuda::cpu

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("batch_norm_acon_c_forward", &acon_cuda::cpu::batch_norm_acon_c_forward_cpu);
  m.impl("batch_norm_acon_c_backward", &acon_cuda::cpu::batch_norm_acon_c_backward_cpu);
}
