// CPU kernels of Meta-ACON's x-sized steps outside the acon ops: the
// per-sample mean that feeds the generator, and the mean's gradient added
// into dx. csrc/meta_acon_c.cpp calls them for CPU tensors.
#pragma once

#include <ATen/ATen.h>

namespace acon_cuda::cpu {

// The mean of x over every axis but the batch (0) and channel_dim, shape
// (N, C), in x's dtype; summed in float (double for float64 x), each block
// of 256 values then in double, in one read of x in its own memory layout.
at::Tensor sample_channel_means(const at::Tensor& x, int64_t channel_dim);

// grad_x[n, ..., c, ...] += scale * term[n, c] in place, in one pass; false
// (nothing done) where grad_x is not dense with its batch axis outermost.
bool add_sample_channel_(const at::Tensor& grad_x, const at::Tensor& term, int64_t channel_dim, double scale);

} // namespace acon_cuda::cpu
