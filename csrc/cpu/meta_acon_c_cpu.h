// CPU kernels of Meta-ACON's generator outside the acon ops: the per-sample
// mean that feeds it, its matrix products and sums, and its BatchNorms on
// (N, F) values. csrc/meta_acon_c_generator.cpp calls them for CPU tensors.
#pragma once

#include "../meta_acon_c_generator.h"

#include <ATen/ATen.h>

namespace acon_cuda::cpu {

// The mean of x over every axis but the batch (0) and channel_dim, shape
// (N, C), in x's dtype; summed in float (double for float64 x), each block
// of 256 values then in double, in one read of x in its own memory layout.
at::Tensor sample_channel_means(const at::Tensor& x, int64_t channel_dim);

// Whether bias + a @ b (a: rows x inner, b: inner x cols) is small enough
// for small_product, and of its dtypes (float or double, all alike; bias
// undefined: none).
bool is_small_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);

// bias + a @ b into a new contiguous (rows, cols) tensor (of any size, but
// meant for those is_small_product takes), for any strides, in
// plain loops: at the generator's small sizes ATen's addmm costs more in
// per-call set-up (6-8 us here) than the arithmetic. Each output element is
// summed over the inner axis in a fixed order, then the bias added.
at::Tensor small_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);

// Whether parallel_product pays: more than one thread, and enough
// arithmetic (below ~1 MFLOP the threads' start-up costs more than they save).
bool is_parallel_product(const at::Tensor& a, const at::Tensor& b);

// bias + a @ b cut into one block of rows or columns per thread, each an
// ordinary BLAS call: BLAS libraries hardly parallelise these short products
// (N rows, N the batch), which made them the generator's largest cost on 2
// cores. Each output element is still computed by one call, so results do
// not depend on timing.
at::Tensor parallel_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias);

// Whether column_sums takes a: a small (rows, cols) float or double matrix.
bool is_small_column_sum(const at::Tensor& a);

// a.sum(0) of such a matrix, in its dtype, in one loop (rows summed in
// order): the generator's bias gradients.
at::Tensor column_sums(const at::Tensor& a);

// nn.BatchNorm's forward on (N, F) values, as at::native_batch_norm computes
// it (training: batch statistics, running statistics updated with momentum
// and the unbiased variance; otherwise the running statistics), in one
// call without ATen's per-call set-up, which costs more than these small
// tensors' arithmetic. Returns (out, save_mean, save_invstd), the last two in
// the accumulate type (double for float32, as ATen accumulates; empty
// without batch statistics).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows(const at::Tensor& input, const BatchNorm& bn);

// Its backward: (grad_input, grad_weight, grad_bias), the last two undefined
// unless asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows_backward(
    const at::Tensor& grad_out,
    const BatchNorm& bn,
    const BatchNormSaved& saved,
    std::array<bool, 3> output_mask);

} // namespace acon_cuda::cpu
