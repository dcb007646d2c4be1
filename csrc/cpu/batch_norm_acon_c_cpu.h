// BatchNorm fused with ACON-C on the CPU (batch_norm_acon_c_cpu.cpp), as the
// ops batch_norm_acon_c_forward / _backward run it (per-channel beta), and
// with a per-sample beta generated from the BatchNorm output's per-sample
// means in between the passes: Meta-ACON after BatchNorm, whose autograd node
// (csrc/meta_acon_c.cpp) passes its generator as the callbacks below.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <tuple>

namespace acon_cuda::cpu {

// The BatchNorm before ACON-C, resolved as F.batch_norm takes it: training
// means batch statistics; running statistics undefined where none are
// passed (updated in place with batch statistics).
struct NormArgs {
  at::Tensor weight, bias, running_mean, running_var;
  bool training = true;
  double momentum = 0.0;
  double eps = 1e-5;
};

// Meta-ACON's generator: beta (N, C) from the BatchNorm output's means over
// each sample's map (N, C, x's dtype).
using BetaFromMeans = std::function<at::Tensor(const at::Tensor& means)>;
// Its backward: the means' gradient (N, C; undefined when nothing needs it)
// from beta's (N, C, beta's dtype).
using MeansGradFromBetaGrad = std::function<at::Tensor(const at::Tensor& grad_beta)>;

// The checks of the fused forward (errors name the argument), before any
// state changes: x, p1, p2 as acon_c on axis 1, beta per channel (undefined:
// generated), the BatchNorm's per-channel tensors, running statistics
// where training is false, and more than one value per channel where it is
// true.
void check_batch_norm_acon_c_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    const NormArgs& norm);

struct NormAconCForward {
  at::Tensor y;
  // The statistics normalised with (C, opmath precision), which the
  // backward takes.
  at::Tensor save_mean, save_invstd;
  // Per-sample beta only: beta (N, C) as generated, and each sample's mean
  // of x minus the channel's mean (N, C, float64), which the backward takes.
  at::Tensor beta, sample_offsets;
};

// beta_from_means empty: beta per channel (C values). Otherwise beta is
// ignored and generated per sample.
NormAconCForward batch_norm_acon_c_forward(
    const at::Tensor& x,
    const NormArgs& norm,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    const BetaFromMeans& beta_from_means = {});

// (grad_x, grad_weight, grad_bias, grad_p1, grad_p2, grad_beta); output_mask
// = [x's, weight's and bias's, p1's, p2's and beta's]. With means_grad
// (beta per sample, and the forward's sample_offsets): beta's gradient goes
// to means_grad, and the means' gradient it returns into x's, weight's and
// bias's.
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
    const at::Tensor& sample_offsets = {},
    const MeansGradFromBetaGrad& means_grad = {});

} // namespace acon_cuda::cpu
