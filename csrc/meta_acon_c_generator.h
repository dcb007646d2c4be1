// Meta-ACON's generator, beta = sigmoid(bn2(fc2(bn1(fc1(mean(x)))))), is
// built from these: matrix products, sums and BatchNorms on (N, F) values,
// each run on the CPU by csrc/cpu/meta_acon_c_cpu.h's loops where ATen's
// per-call set-up costs more than the arithmetic, and by ATen elsewhere.
// csrc/meta_acon_c.cpp composes them into the generator and its backward.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

namespace acon_cuda {

// Whether product(a, b, bias) runs in cpu::small_product's plain loops
// (whose output layout the backward chooses a product's order by).
bool small_product_runs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {});

// bias + a @ b (bias undefined: none). On the CPU, unless a dispatch mode is
// active: cpu::small_product's loops for small products, one BLAS call per
// thread (cpu::parallel_product) for large ones.
at::Tensor product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {});

// a.sum(0) of a (rows, cols) matrix: a bias's gradient.
at::Tensor column_sums(const at::Tensor& a);

// Every axis of x but the batch (0) and cdim: those the mean runs over.
std::vector<int64_t> reduced_axes(const at::Tensor& x, int64_t cdim);

// The mean of x over every axis but batch and channel, (N, C), in x's dtype.
// 16-bit x is summed in float32 (a float16 sum of a large map overflows).
at::Tensor sample_channel_means(const at::Tensor& x, int64_t cdim);

// How one BatchNorm normalises, as nn.BatchNorm2d.forward resolves it from
// its settings (csrc/meta_acon_c.cpp, batch_norm_mode).
struct BatchNormMode {
  // Used without batch statistics, updated with them; undefined: none.
  at::Tensor running_mean, running_var;
  bool use_batch_stats = true;
  double momentum = 0.0;
  double eps = 0.0;
};

// One BatchNorm as the generator calls it.
struct BatchNorm {
  at::Tensor weight, bias; // undefined: affine=False
  BatchNormMode mode;
};

// at::native_batch_norm on (N, F) values: (out, save_mean, save_invstd).
// Raises for parameters or running statistics of another size or device,
// which native_batch_norm would read and write out of bounds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(const at::Tensor& input, const BatchNorm& bn);

// What a BatchNorm's backward reads of its forward: the input, and the
// batch statistics batch_norm returned (empty without batch statistics).
struct BatchNormSaved {
  at::Tensor input, save_mean, save_invstd;
};

// at::native_batch_norm_backward on (N, F) values.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_out,
    const BatchNorm& bn,
    const BatchNormSaved& saved,
    std::array<bool, 3> output_mask);

} // namespace acon_cuda
