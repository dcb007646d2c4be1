// Device-independent part of the fused ACON-C ops: argument checks and the
// memory layout the kernels iterate over. Kernels for every device share it.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace acon_cuda {

// The kernels see x as a contiguous [groups, outer, channels, inner] block:
// `groups` is the batch for a per-sample beta (1 otherwise), `outer` the
// product of the sizes stored before the channel axis (per group) and `inner`
// the product of those stored after it. NCHW gives inner = H*W; channels_last
// and features-last give inner = 1.
struct ChannelLayout {
  int64_t groups = 1;
  int64_t outer = 1;
  int64_t channels = 0;
  int64_t inner = 1;
  bool per_sample_beta = false;
};

// Validates the arguments of acon_c_forward / acon_c_backward (grad_y may be
// undefined for the forward; beta undefined checks only x, p1, p2 and
// channel_dim, for Meta-ACON's op) and returns the channel axis in
// [0, x.dim()).
// Errors name the offending argument and raise ValueError / TypeError.
int64_t check_acon_c_args(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    const at::Tensor& grad_y = at::Tensor());

// Working copies of x (and grad_y) in the memory layout of `out`, which must
// have been allocated with at::empty_like(x): the kernels then read and write
// every tensor with the same flat index. Copies only when a layout differs.
struct WorkTensors {
  ChannelLayout layout;
  at::Tensor out; // written by the kernel; equals the caller's out unless
                  // the layout needed a contiguous detour (copy back!)
  at::Tensor x;
  at::Tensor grad_y; // undefined for the forward
};
WorkTensors make_work_tensors(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& beta,
    int64_t channel_dim,
    const at::Tensor& grad_y = at::Tensor());
// The same, per sample (groups = N, batch outermost) or not, before any beta
// exists (Meta-ACON after BatchNorm generates it from a first pass over x).
WorkTensors make_work_tensors(
    const at::Tensor& out,
    const at::Tensor& x,
    bool per_sample_beta,
    int64_t channel_dim,
    const at::Tensor& grad_y = at::Tensor());

// t's layout as groups = N samples of [outer, channels, inner], where t is
// dense with its batch axis outermost (what empty_like gives for a dense x);
// nullopt otherwise. Meta-ACON's per-sample means use it.
std::optional<ChannelLayout> sample_channel_layout(const at::Tensor& t, int64_t channel_dim);

// The precision the kernels compute x's dtype in (ATen's opmath type as a
// ScalarType): float64 for float64, float32 for every other dtype.
inline at::ScalarType opmath_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t's values, contiguous, in `dtype` (the kernels read parameters as flat
// arrays): t itself in the usual case (float32 parameters, or float64 for
// float64 x), so no tensor op runs per call.
at::Tensor values_in(const at::Tensor& t, at::ScalarType dtype);

// The acon ops called below autograd (csrc/acon_c_autograd.cpp): for code
// that does its own autograd, such as Meta-ACON's node.
using AconCGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
at::Tensor call_acon_c_forward(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim);
AconCGrads call_acon_c_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    std::array<bool, 2> output_mask);

// What acon_c_backward returns for an output its output_mask leaves out:
// an empty tensor (0 elements) of t's dtype and device.
at::Tensor masked_out_grad(const at::Tensor& t);

} // namespace acon_cuda
