#include "meta_acon_c_cpu.h"

#include "../acon_c.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace acon_cuda::cpu {
namespace {

// Values summed in opmath before the running total (double) takes them:
// short float sums keep float32's rounding error small, and the eight
// independent lanes let the compiler vectorise.
constexpr int64_t kBlock = 256;

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
    total += static_cast<double>(((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                                 ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + rest);
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

} // namespace

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
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
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

bool add_sample_channel_(const at::Tensor& grad_x, const at::Tensor& term, int64_t channel_dim, double scale) {
  const std::optional<ChannelLayout> layout = sample_channel_layout(grad_x, channel_dim);
  if (!layout) {
    return false;
  }
  const ChannelLayout& lay = *layout;
  const int64_t C = lay.channels;
  const int64_t rows = lay.groups * lay.outer; // rows of [C, inner]
  const at::Tensor terms = term.to(grad_x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "add_sample_channel_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t* t = terms.const_data_ptr<scalar_t>();
    const acc_t alpha = static_cast<acc_t>(scale);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (C * lay.inner));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* t_row = t + row / lay.outer * C;
        scalar_t* d = dx + row * C * lay.inner;
        if (lay.inner == 1) { // channels innermost: one vectorisable loop
          for (int64_t c = 0; c < C; ++c) {
            d[c] = static_cast<scalar_t>(static_cast<acc_t>(d[c]) + alpha * static_cast<acc_t>(t_row[c]));
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t add = alpha * static_cast<acc_t>(t_row[c]);
          scalar_t* run = d + c * lay.inner;
          for (int64_t i = 0; i < lay.inner; ++i) {
            run[i] = static_cast<scalar_t>(static_cast<acc_t>(run[i]) + add);
          }
        }
      }
    });
  });
  return true;
}

} // namespace acon_cuda::cpu
