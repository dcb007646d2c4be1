#include "meta_acon_c_cpu.h"

#include "../acon_c.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace acon_cuda::cpu {
namespace {

// Values summed in opmath before the running total (double) takes them:
// short float sums keep float32's rounding error small, and the eight
// independent lanes let the compiler vectorise.
constexpr int64_t kBlock = 256;

// Values per parallel task, at least.
constexpr int64_t kGrainValues = int64_t{1} << 15;

template <typename scalar_t>
double run_sum(const scalar_t* v, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    acc_t lanes[8] = {};
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      for (int k = 0; k < 8; ++k) {
        lanes[k] += static_cast<acc_t>(v[i + k]);
      }
    }
    acc_t rest = 0;
    for (; i < i1; ++i) {
      rest += static_cast<acc_t>(v[i]);
    }
    total += static_cast<double>(
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + rest);
  }
  return total;
}

// float, the common case: GCC does not vectorise the lanes above (scalar
// adds, half the bandwidth on NCHW's short runs), so written with vector
// types (GCC/Clang extension: SSE2 or NEON, what the baseline build has).
template <>
double run_sum<float>(const float* v, int64_t n) {
  using Float4 = float __attribute__((vector_size(16)));
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    Float4 low = {0, 0, 0, 0};
    Float4 high = {0, 0, 0, 0};
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      Float4 a, b;
      std::memcpy(&a, v + i, sizeof(a));
      std::memcpy(&b, v + i + 4, sizeof(b));
      low += a;
      high += b;
    }
    float rest = 0;
    for (; i < i1; ++i) {
      rest += v[i];
    }
    const Float4 lanes = low + high;
    total += static_cast<double>((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + rest);
  }
  return total;
}

// One sample's channel sums into total[0, C), x holding its [outer, C, inner] block.
template <typename scalar_t>
void sample_sums(const scalar_t* x, const ChannelLayout& lay, double* total, at::opmath_type<scalar_t>* block) {
  const int64_t C = lay.channels;
  std::fill(total, total + C, 0.0);
  if (lay.inner == 1) {
    // Channels innermost: column sums, a block of rows at a time.
    for (int64_t r0 = 0; r0 < lay.outer; r0 += kBlock) {
      std::fill(block, block + C, 0);
      const int64_t r1 = std::min(lay.outer, r0 + kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          block[c] += static_cast<at::opmath_type<scalar_t>>(row[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        total[c] += static_cast<double>(block[c]);
      }
    }
    return;
  }
  for (int64_t r = 0; r < lay.outer; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      total[c] += run_sum(x + (r * C + c) * lay.inner, lay.inner);
    }
  }
}

// Largest product (multiply-adds) small_product takes. Timed against ATen's
// addmm / mm (benchmarks/probes/small_products.py, 2-core build machine),
// these loops are ahead only below about 16K multiply-adds; at 32x96x16 (49K)
// they take 21 us against 11 us for mm.
constexpr int64_t kSmallProduct = int64_t{1} << 14;

template <typename T>
void small_product_typed(
    const T* a,
    int64_t a_row,
    int64_t a_inner,
    const T* b,
    int64_t b_inner,
    int64_t b_col,
    T* out,
    int64_t rows,
    int64_t inner,
    int64_t cols) {
  // Row i of out is a sum of b's rows scaled by a's row i, the inner loop
  // along a row of b, which must be contiguous: b is copied where it is not
  // (the forward's transposed weights; at most a few thousand values).
  std::vector<T> packed;
  if (b_col != 1) {
    packed.resize(inner * cols);
    for (int64_t k = 0; k < inner; ++k) {
      for (int64_t j = 0; j < cols; ++j) {
        packed[k * cols + j] = b[k * b_inner + j * b_col];
      }
    }
    b = packed.data();
    b_inner = cols;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* ai = a + i * a_row;
    T* o = out + i * cols;
    std::fill(o, o + cols, T(0));
    for (int64_t k = 0; k < inner; ++k) {
      const T s = ai[k * a_inner];
      const T* bk = b + k * b_inner;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        o[j] += s * bk[j];
      }
    }
  }
}

bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// What small_product can compute at any size: CPU float or double matrices
// of one dtype, a bias as wide as the output.
bool small_product_takes(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  return a.is_cpu() && b.is_cpu() && is_float_or_double(a) && b.scalar_type() == a.scalar_type() && a.dim() == 2 &&
      b.dim() == 2 && a.size(1) == b.size(0) &&
      (!bias.defined() ||
       (bias.is_cpu() && bias.scalar_type() == a.scalar_type() && bias.dim() == 1 && bias.size(0) == b.size(1)));
}

} // namespace

bool is_small_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  return small_product_takes(a, b, bias) && a.size(0) * a.size(1) * b.size(1) <= kSmallProduct;
}

bool is_parallel_product(const at::Tensor& a, const at::Tensor& b) {
  return at::get_num_threads() >= 2 && a.size(0) * b.size(1) * a.size(1) >= (int64_t{1} << 19);
}

at::Tensor parallel_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  const int64_t rows = a.size(0);
  const int64_t cols = b.size(1);
  at::Tensor out = at::empty({rows, cols}, a.options());
  const bool by_rows = rows >= cols;
  const int64_t length = by_rows ? rows : cols;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), length);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // Grad mode is per thread and on by default in the pool's threads (the
    // caller's is off: a node's forward or backward).
    const at::NoGradGuard no_grad;
    for (int64_t part = begin; part < end; ++part) {
      const int64_t start = length * part / parts;
      const int64_t size = length * (part + 1) / parts - start;
      const at::Tensor a_part = by_rows ? a.narrow(0, start, size) : a;
      const at::Tensor b_part = by_rows ? b : b.narrow(1, start, size);
      at::Tensor out_part = out.narrow(by_rows ? 0 : 1, start, size);
      if (bias.defined()) {
        at::addmm_out(out_part, by_rows ? bias : bias.narrow(0, start, size), a_part, b_part);
      } else {
        at::mm_out(out_part, a_part, b_part);
      }
    }
  });
  return out;
}

bool is_small_column_sum(const at::Tensor& a) {
  return a.is_cpu() && is_float_or_double(a) && a.dim() == 2 && a.numel() <= kSmallProduct;
}

at::Tensor small_product(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  // Any size (benchmarks/probes/small_products.py times it past the limit).
  TORCH_INTERNAL_ASSERT(small_product_takes(a, b, bias));
  const int64_t rows = a.size(0), inner = a.size(1), cols = b.size(1);
  at::Tensor out = at::empty({rows, cols}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "small_product", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    small_product_typed<scalar_t>(
        a.const_data_ptr<scalar_t>(),
        a.stride(0),
        a.stride(1),
        b.const_data_ptr<scalar_t>(),
        b.stride(0),
        b.stride(1),
        o,
        rows,
        inner,
        cols);
    if (bias.defined()) {
      const scalar_t* v = bias.const_data_ptr<scalar_t>();
      const int64_t step = bias.stride(0);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          o[i * cols + j] += v[j * step];
        }
      }
    }
  });
  return out;
}

at::Tensor column_sums(const at::Tensor& a) {
  TORCH_INTERNAL_ASSERT(is_small_column_sum(a));
  const int64_t rows = a.size(0), cols = a.size(1);
  at::Tensor out = at::zeros({cols}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "column_sums", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* v = a.const_data_ptr<scalar_t>();
    const int64_t row_step = a.stride(0), col_step = a.stride(1);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        o[j] += v[i * row_step + j * col_step];
      }
    }
  });
  return out;
}

at::Tensor sample_channel_means(const at::Tensor& x, int64_t channel_dim) {
  std::optional<ChannelLayout> layout = sample_channel_layout(x, channel_dim);
  const at::Tensor xs = layout ? x : x.contiguous();
  if (!layout) {
    layout = sample_channel_layout(xs, channel_dim);
  }
  const ChannelLayout& lay = *layout;
  const int64_t N = x.size(0);
  const int64_t C = lay.channels;
  at::Tensor out = at::empty({N, C}, x.options());
  const int64_t count = lay.outer * lay.inner;
  if (out.numel() == 0) {
    return out;
  }
  if (count == 0) {
    return out.fill_(std::numeric_limits<double>::quiet_NaN()); // as x.mean of nothing
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sample_channel_means", [&] {
    const scalar_t* data = xs.const_data_ptr<scalar_t>();
    scalar_t* means = out.mutable_data_ptr<scalar_t>();
    // Samples per task: ~32K values (waking the pool for less costs more).
    const int64_t grain = std::max<int64_t>(1, kGrainValues / (count * C));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> total(C);
      std::vector<at::opmath_type<scalar_t>> block(C);
      for (int64_t n = begin; n < end; ++n) {
        sample_sums(data + n * count * C, lay, total.data(), block.data());
        for (int64_t c = 0; c < C; ++c) {
          means[n * C + c] = static_cast<scalar_t>(total[c] / static_cast<double>(count));
        }
      }
    });
  });
  return out;
}

namespace {

// A per-feature vector's values in opmath (fallback where undefined), read
// in place: no tensor op for these few values.
template <typename opmath_t>
std::vector<opmath_t> feature_values(const at::Tensor& t, int64_t F, opmath_t fallback) {
  std::vector<opmath_t> values(F, fallback);
  if (t.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "feature_values", [&] {
      const scalar_t* data = t.const_data_ptr<scalar_t>();
      const int64_t stride = t.stride(0);
      for (int64_t f = 0; f < F; ++f) {
        values[f] = static_cast<opmath_t>(data[f * stride]);
      }
    });
  }
  return values;
}

// values written into t (in place) or into a new tensor of `options`.
template <typename opmath_t>
at::Tensor write_features(const std::vector<opmath_t>& values, at::Tensor t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_features", [&] {
    scalar_t* data = t.mutable_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (size_t f = 0; f < values.size(); ++f) {
      data[f * stride] = static_cast<scalar_t>(values[f]);
    }
  });
  return t;
}

// The running statistics the BatchNorm normalises with, without batch
// statistics: their mean and 1 / sqrt(var + eps) per feature (mean 0 and
// var 1 where undefined).
template <typename opmath_t>
std::pair<std::vector<opmath_t>, std::vector<opmath_t>> running_mean_invstd(const BatchNormMode& mode, int64_t F) {
  std::vector<opmath_t> mean = feature_values<opmath_t>(mode.running_mean, F, 0);
  std::vector<opmath_t> invstd = feature_values<opmath_t>(mode.running_var, F, 1);
  for (int64_t f = 0; f < F; ++f) {
    invstd[f] = opmath_t(1) / std::sqrt(invstd[f] + static_cast<opmath_t>(mode.eps));
  }
  return {mean, invstd};
}

template <typename opmath_t>
at::Tensor feature_tensor(const std::vector<opmath_t>& values, const at::TensorOptions& options) {
  return write_features(values, at::empty({static_cast<int64_t>(values.size())}, options));
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows(const at::Tensor& input, const BatchNorm& bn) {
  const BatchNormMode& mode = bn.mode;
  const at::Tensor in = input.contiguous();
  const int64_t N = in.size(0);
  const int64_t F = in.size(1);
  at::Tensor out = at::empty_like(in);
  at::Tensor save_mean, save_invstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "batch_norm_rows", [&] {
    using opmath_t = at::acc_type<scalar_t, false>;
    const at::TensorOptions stat_options = in.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    std::vector<opmath_t> mean(F, 0), invstd(F, 0);
    if (mode.use_batch_stats) {
      std::vector<opmath_t> var_sum(F, 0);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t f = 0; f < F; ++f) {
          mean[f] += static_cast<opmath_t>(x[n * F + f]);
        }
      }
      for (int64_t f = 0; f < F; ++f) {
        mean[f] /= static_cast<opmath_t>(N);
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t f = 0; f < F; ++f) {
          const opmath_t d = static_cast<opmath_t>(x[n * F + f]) - mean[f];
          var_sum[f] += d * d;
        }
      }
      for (int64_t f = 0; f < F; ++f) {
        invstd[f] = opmath_t(1) / std::sqrt(var_sum[f] / static_cast<opmath_t>(N) + static_cast<opmath_t>(mode.eps));
      }
      if (mode.running_mean.defined() && mode.running_var.defined()) {
        // In place, in the buffers' own dtype, as native_batch_norm does.
        std::vector<opmath_t> rm = feature_values<opmath_t>(mode.running_mean, F, 0);
        std::vector<opmath_t> rv = feature_values<opmath_t>(mode.running_var, F, 1);
        const auto m = static_cast<opmath_t>(mode.momentum);
        for (int64_t f = 0; f < F; ++f) {
          rm[f] = m * mean[f] + (1 - m) * rm[f];
          rv[f] = m * var_sum[f] / static_cast<opmath_t>(N - 1) + (1 - m) * rv[f];
        }
        write_features(rm, mode.running_mean);
        write_features(rv, mode.running_var);
        // Written through pointers: tell autograd, as an in-place op would.
        torch::autograd::impl::bump_version(mode.running_mean);
        torch::autograd::impl::bump_version(mode.running_var);
      }
      save_mean = feature_tensor(mean, stat_options);
      save_invstd = feature_tensor(invstd, stat_options);
    } else {
      std::tie(mean, invstd) = running_mean_invstd<opmath_t>(mode, F);
      save_mean = at::empty({0}, stat_options);
      save_invstd = at::empty({0}, stat_options);
    }
    // out = x * scale + shift, per feature.
    const std::vector<opmath_t> w = feature_values<opmath_t>(bn.weight, F, 1);
    const std::vector<opmath_t> b = feature_values<opmath_t>(bn.bias, F, 0);
    std::vector<opmath_t> scale(F), shift(F);
    for (int64_t f = 0; f < F; ++f) {
      scale[f] = invstd[f] * w[f];
      shift[f] = b[f] - mean[f] * scale[f];
    }
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t f = 0; f < F; ++f) {
        y[n * F + f] = static_cast<scalar_t>(static_cast<opmath_t>(x[n * F + f]) * scale[f] + shift[f]);
      }
    }
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_rows_backward(
    const at::Tensor& grad_out,
    const BatchNorm& bn,
    const BatchNormSaved& saved,
    std::array<bool, 3> output_mask) {
  const BatchNormMode& mode = bn.mode;
  const at::Tensor in = saved.input.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const int64_t N = in.size(0);
  const int64_t F = in.size(1);
  at::Tensor grad_in = output_mask[0] ? at::empty_like(in) : at::Tensor();
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "batch_norm_rows_backward", [&] {
    using opmath_t = at::acc_type<scalar_t, false>;
    std::vector<opmath_t> mean, invstd;
    if (mode.use_batch_stats) {
      mean = feature_values<opmath_t>(saved.save_mean, F, 0);
      invstd = feature_values<opmath_t>(saved.save_invstd, F, 0);
    } else {
      std::tie(mean, invstd) = running_mean_invstd<opmath_t>(mode, F);
    }
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    // sum_dy and sum_dy_xhat per feature.
    std::vector<opmath_t> sum_dy(F, 0), sum_dy_xhat(F, 0);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t f = 0; f < F; ++f) {
        const opmath_t d = static_cast<opmath_t>(g[n * F + f]);
        sum_dy[f] += d;
        sum_dy_xhat[f] += d * (static_cast<opmath_t>(x[n * F + f]) - mean[f]) * invstd[f];
      }
    }
    const std::vector<opmath_t> w = feature_values<opmath_t>(bn.weight, F, 1);
    if (grad_in.defined()) {
      scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
      const auto inv_n = opmath_t(1) / static_cast<opmath_t>(N);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t f = 0; f < F; ++f) {
          const opmath_t d = static_cast<opmath_t>(g[n * F + f]);
          if (mode.use_batch_stats) {
            const opmath_t xhat = (static_cast<opmath_t>(x[n * F + f]) - mean[f]) * invstd[f];
            gi[n * F + f] =
                static_cast<scalar_t>(w[f] * invstd[f] * (d - sum_dy[f] * inv_n - xhat * sum_dy_xhat[f] * inv_n));
          } else {
            gi[n * F + f] = static_cast<scalar_t>(d * w[f] * invstd[f]);
          }
        }
      }
    }
    const at::TensorOptions params = bn.weight.defined() ? bn.weight.options() : in.options();
    if (output_mask[1]) {
      grad_weight = feature_tensor(sum_dy_xhat, params);
    }
    if (output_mask[2]) {
      grad_bias = feature_tensor(sum_dy, params);
    }
  });
  return {grad_in, grad_weight, grad_bias};
}

} // namespace acon_cuda::cpu
