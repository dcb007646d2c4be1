// CPU kernels of BatchNorm fused with ACON-C (batch_norm_acon_c_cpu.cpp), in
// the same per-instruction-set builds as the acon kernels, whose element
// functions they share (acon_c_kernel_impl.h, included first).
//
// Every pass is one of two shapes over x's ChannelLayout, each parametrised
// by an element operation that reads kRows per-channel values:
// - map_channels: out = Op::apply(x[, dy], values) (the forward; grad_x);
// - reduce_channels: kSums per-channel sums that Op::accumulate(x[, dy],
//   values, sums) adds to (the batch statistics; the backward's sums), and,
//   where an output is given, the value it returns stored per element; in blocks
//   that depend on the problem size only, each summed in a fixed order, then
//   combined in block order: bit-identical for any thread count.
// With groups > 1 (a sample each: Meta-ACON after BatchNorm) the values may
// differ per group and the sums are per group and channel; no block spans
// two groups.
#pragma once

#include "acon_c_kernel_impl.h"

namespace acon_cuda::cpu::CPU_CAPABILITY {
namespace {

// The statistics pass: with u = x - shift (shift = one of the channel's own
// values, so that u's sums do not cancel), sum u and sum u^2.
struct ShiftedMoments {
  static constexpr int kRows = 1;
  static constexpr int kSums = 2;
  static constexpr int kUnscaledG = -1; // no G sum
  static constexpr bool kReadsGrad = false;
  template <typename V>
  static V accumulate(const V& x, const V& /*dy*/, const V* p, V* sums) {
    const V u = x - p[0];
    sums[0] = sums[0] + u;
    sums[1] = mul_add(u, u, sums[1]);
    return u; // never stored
  }
};

// z = (x - mean) * scale + shift, the BatchNorm's output (scale = weight *
// invstd, shift = bias); then ACON-C of z with d, p2 and bd = beta * d.
// Centred first, so z keeps its precision when |mean| >> std.
template <typename V>
inline V normalized(const V& xc, const V* p) {
  return mul_add(xc, p[1], p[2]);
}

struct NormAconCValue {
  static constexpr int kRows = 6; // mean, scale, shift, d, p2, bd
  static constexpr bool kReadsGrad = false;
  template <typename V>
  static V apply(const V& x, const V& /*dy*/, const V* p) {
    return acon_c_value(normalized(x - p[0], p), p[3], p[4], p[5]);
  }
};

// The backward's first pass: ACON-C's three sums (in z) and the
// BatchNorm's two, sum dz and sum dz * (x - mean), dz = dy * ACON-C'(z); it
// returns dz * p[6] for the caller to store: grad_x itself without batch
// statistics (p[6] = scale), dz with them (p[6] = 1), which
// NormGradFromDz then turns into grad_x in place. dz is then rounded to x's
// dtype between the passes, as the two ops round it.
struct NormAconCGradTerms {
  static constexpr int kRows = 7; // NormAconCValue's, and dz's factor
  static constexpr int kSums = 5;
  // Sum 2, G, leaves out its factor d^2 (row 3; AconCGrad).
  static constexpr int kUnscaledG = 2;
  static constexpr int kDRow = 3;
  static constexpr bool kReadsGrad = true;
  template <typename V>
  static V accumulate(const V& x, const V& dy, const V* p, V* sums) {
    const V xc = x - p[0];
    const auto g = acon_c_grad(normalized(xc, p), dy, p[3], p[4], p[5]);
    g.add_to(sums[0], sums[1], sums[2]);
    sums[3] = sums[3] + g.dx;
    sums[4] = mul_add(g.dx, xc, sums[4]);
    return g.dx * p[6];
  }
};

// grad_x = dz * scale + (x - mean) * e + f, from the dz the first pass
// stored (read as dy): e and f fold in the batch statistics' own gradient
// (docs/batch_norm.md).
struct NormGradFromDz {
  static constexpr int kRows = 4; // mean, scale, e, f
  static constexpr bool kReadsGrad = true;
  template <typename V>
  static V apply(const V& x, const V& dz, const V* p) {
    return mul_add(dz, p[1], mul_add(x - p[0], p[2], p[3]));
  }
};

// The kRows values of the kWidth channels from c on (a line each, see
// Lines), or of channel c alone in every lane.
template <int kRows, typename FVec, typename opmath_t>
inline void load_values(const opmath_t* lines, int64_t c, FVec* p) {
  const opmath_t* at_c = lines + Lines<opmath_t, kRows>::index(c);
  for (const auto k : c10::irange(kRows)) {
    p[k] = FVec::loadu(at_c + k * Lines<opmath_t, kRows>::kLine);
  }
}

template <int kRows, typename FVec, typename opmath_t>
inline void broadcast_values(const opmath_t* lines, int64_t c, FVec* p) {
  const opmath_t* at_c = lines + Lines<opmath_t, kRows>::index(c);
  for (const auto k : c10::irange(kRows)) {
    p[k] = FVec(at_c[k * Lines<opmath_t, kRows>::kLine]);
  }
}

// The element-wise passes stream x (and dy) from memory with more
// arithmetic and more value loads per vector than acon_c's kernels; the
// CPU's own prefetching then fell behind (the eval forward of 16x1024x14x14
// channels_last, inputs rotated through more than the caches hold, ran 1.6x
// acon_c's forward on one thread). A software prefetch this far ahead of
// each load measured 15-25% faster there; in the sums passes it measured
// within noise, and they have none.
constexpr int64_t kPrefetchBytes = 1024;

template <typename T>
inline void prefetch_ahead(const T* p) {
  prefetch_bytes_past(p, kPrefetchBytes);
}

// How far apart the groups' sets of value lines lie (0: one set for all).
template <int kRows>
inline int64_t group_line_stride(const NormKernelArgs& args) {
  return args.grouped_rows != 0 ? kRows * args.padded_channels : 0;
}

// Lanes from `first` on that are below n: where a partial vector's terms count.
template <typename FVec>
inline FVec lanes_below(int64_t first, int64_t n) {
  using T = typename FVec::value_type;
  return FVec::arange(static_cast<T>(first), 1) < FVec(static_cast<T>(n));
}

template <typename scalar_t, typename Op>
void map_channels(const NormKernelArgs& args, const at::opmath_type<scalar_t>* lines) {
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const ChannelLayout& lay = args.layout;
  const int64_t C = lay.channels, I = lay.inner;
  const auto* x = static_cast<const scalar_t*>(args.x);
  const auto* dy = static_cast<const scalar_t*>(args.grad_y);
  auto* out = static_cast<scalar_t*>(args.out);
  const auto step = [&](int64_t offset, int64_t n, const FVec(*p)[Op::kRows]) {
    FVec v[L::kNumF], dyv[L::kNumF];
    prefetch_ahead(x + offset);
    L::load(x + offset, n, v);
    if constexpr (Op::kReadsGrad) {
      prefetch_ahead(dy + offset);
      L::load(dy + offset, n, dyv);
    }
    for (const auto j : c10::irange(L::kNumF)) {
      v[j] = Op::apply(v[j], dyv[j], p[j]);
    }
    L::store(out + offset, n, v);
  };
  const int64_t group_rows = lay.outer * (I == 1 ? 1 : C);
  const int64_t rows = lay.groups * group_rows;
  const int64_t row_length = I == 1 ? C : I;
  const int64_t group_stride = group_line_stride<Op::kRows>(args);
  // Row r's value lines: no division per row unless they differ per group
  // (a run of a 7x7 map is a few vectors).
  const auto lines_of_row = [&](int64_t r) {
    return group_stride == 0 ? lines : lines + r / group_rows * group_stride;
  };
  at::parallel_for(0, rows, ceil_div(kGrainElements, row_length), [&](int64_t r0, int64_t r1) {
    FVec p[L::kNumF][Op::kRows];
    if (I == 1) { // channels innermost: the values change along the row
      for (int64_t r = r0; r < r1; ++r) {
        const auto* group_lines = lines_of_row(r);
        for (int64_t c = 0; c < C; c += L::kStep) {
          for (const auto j : c10::irange(L::kNumF)) {
            load_values<Op::kRows>(group_lines, c + j * L::kWidth, p[j]);
          }
          step(r * C + c, std::min(L::kStep, C - c), p);
        }
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) { // a run of one channel
      for (const auto j : c10::irange(L::kNumF)) {
        broadcast_values<Op::kRows>(lines_of_row(r), r % C, p[j]);
      }
      for (int64_t i = 0; i < I; i += L::kStep) {
        step(r * I + i, std::min(L::kStep, I - i), p);
      }
    }
  });
}

// Sums over a block's channels-innermost rows [u0, u1) into its double
// partials `own` (kSums lines of C), through opmath sums in `acc`
// (Lines<opmath_t, kSums>, zeroed) moved into `own` every kFlushRows rows.
// Rows in memory order, one at a time, or two sharing each load of values
// and sums where that measured faster: rows of at most two vectors (C = 24:
// the loads are a large part of the work) and rows a multiple of 4 KB long
// (C = 1024 float). Elsewhere (C = 128 to 512) two measured 10-30% slower
// than one, and four slower still (registers run out). Going down a column
// of channels over many rows instead reads as many streams as rows, which
// measured 2-3x slower.
template <typename scalar_t, typename Op, bool kStore>
void reduce_block_channels_inner(
    const NormKernelArgs& args,
    const at::opmath_type<scalar_t>* lines,
    int64_t u0,
    int64_t u1,
    at::opmath_type<scalar_t>* acc,
    double* own) {
  using L = Lanes<scalar_t>;
  using opmath_t = typename L::opmath_t;
  using FVec = typename L::FVec;
  using SL = Lines<opmath_t, Op::kSums>;
  const int64_t C = args.layout.channels;
  const bool two_rows = C <= 2 * L::kStep || (C * static_cast<int64_t>(sizeof(scalar_t))) % 4096 == 0;
  const auto* x = static_cast<const scalar_t*>(args.x);
  const auto* dy = static_cast<const scalar_t*>(args.grad_y);
  auto* out = static_cast<scalar_t*>(args.out);
  double* sinks[Op::kSums];
  for (const auto k : c10::irange(Op::kSums)) {
    sinks[k] = own + k * C;
  }
  const auto move = [&] { move_line_sums<opmath_t, Op::kSums>(acc, C, sinks); };
  // Rows [r, r + kRows) into acc.
  const auto add_rows = [&](int64_t r, auto rows_constant) {
    constexpr int kRows = decltype(rows_constant)::value;
    for (int64_t c = 0; c < C; c += L::kStep) {
      const int64_t n = std::min(L::kStep, C - c);
      FVec xv[kRows][L::kNumF], dyv[kRows][L::kNumF], stored[kRows][L::kNumF];
      for (const auto q : c10::irange(kRows)) {
        L::load(x + (r + q) * C + c, n, xv[q]);
        if constexpr (Op::kReadsGrad) {
          L::load(dy + (r + q) * C + c, n, dyv[q]);
        }
      }
      // Lanes past C load zeros and add their (possibly non-zero) terms to
      // the padding, which is never read.
      for (const auto j : c10::irange(L::kNumF)) {
        FVec p[Op::kRows], sums[Op::kSums];
        load_values<Op::kRows>(lines, c + j * L::kWidth, p);
        load_values<Op::kSums>(acc, c + j * L::kWidth, sums);
        for (const auto q : c10::irange(kRows)) {
          stored[q][j] = Op::accumulate(xv[q][j], dyv[q][j], p, sums);
        }
        opmath_t* s = acc + SL::index(c + j * L::kWidth);
        for (const auto k : c10::irange(Op::kSums)) {
          sums[k].store(s + k * SL::kLine);
        }
      }
      if constexpr (kStore) {
        for (const auto q : c10::irange(kRows)) {
          L::store(out + (r + q) * C + c, n, stored[q]);
        }
      }
    }
  };
  for (int64_t r0 = u0; r0 < u1; r0 += kFlushRows) {
    const int64_t r1 = std::min(u1, r0 + kFlushRows);
    int64_t r = r0;
    if (two_rows) {
      for (; r + 2 <= r1; r += 2) {
        add_rows(r, std::integral_constant<int, 2>());
      }
    }
    for (; r < r1; ++r) {
      add_rows(r, std::integral_constant<int, 1>());
    }
    move();
  }
}

// Sums over a block's runs [u0, u1) (one channel each, inner > 1) into its
// double partials `own`, each run's lanes reduced by a fixed tree.
template <typename scalar_t, typename Op, bool kStore>
void reduce_block_channel_runs(
    const NormKernelArgs& args,
    const at::opmath_type<scalar_t>* lines,
    int64_t u0,
    int64_t u1,
    double* own) {
  using L = Lanes<scalar_t>;
  using FVec = typename L::FVec;
  const int64_t C = args.layout.channels, I = args.layout.inner;
  const auto* x = static_cast<const scalar_t*>(args.x);
  const auto* dy = static_cast<const scalar_t*>(args.grad_y);
  auto* out = static_cast<scalar_t*>(args.out);
  for (int64_t r = u0; r < u1; ++r) {
    const int64_t c = r % C;
    FVec p[L::kNumF][Op::kRows], sums[L::kNumF][Op::kSums];
    for (const auto j : c10::irange(L::kNumF)) {
      broadcast_values<Op::kRows>(lines, c, p[j]);
    }
    const auto flush = [&] {
      for (const auto k : c10::irange(Op::kSums)) {
        FVec lanes[L::kNumF];
        for (const auto j : c10::irange(L::kNumF)) {
          lanes[j] = sums[j][k];
          sums[j][k] = FVec(0);
        }
        own[k * C + c] += L::sum(lanes);
      }
    };
    for (const auto j : c10::irange(L::kNumF)) {
      for (const auto k : c10::irange(Op::kSums)) {
        sums[j][k] = FVec(0);
      }
    }
    int64_t pending = 0;
    for (int64_t i = 0; i < I; i += L::kStep) {
      const int64_t n = std::min(L::kStep, I - i);
      FVec xv[L::kNumF], dyv[L::kNumF];
      L::load(x + r * I + i, n, xv);
      if constexpr (Op::kReadsGrad) {
        L::load(dy + r * I + i, n, dyv);
      }
      for (const auto j : c10::irange(L::kNumF)) {
        if (n >= (j + 1) * L::kWidth) {
          xv[j] = Op::accumulate(xv[j], dyv[j], p[j], sums[j]);
          continue;
        }
        // Past the run: zeros, whose terms need not be zero.
        FVec t[Op::kSums];
        for (const auto k : c10::irange(Op::kSums)) {
          t[k] = FVec(0);
        }
        xv[j] = Op::accumulate(xv[j], dyv[j], p[j], t);
        const FVec valid = lanes_below<FVec>(j * L::kWidth, n);
        for (const auto k : c10::irange(Op::kSums)) {
          sums[j][k] = sums[j][k] + blend_lanes(FVec(0), t[k], valid);
        }
      }
      if constexpr (kStore) {
        L::store(out + r * I + i, n, xv);
      }
      if ((pending += n) >= kFlushElements) {
        flush();
        pending = 0;
      }
    }
    flush();
  }
}

// Op's kSums sums per group and channel, into `sums` (kSums lines of C
// doubles per group); with kStore, the values its terms return into args.out.
template <typename scalar_t, typename Op, bool kStore>
void reduce_channels(const NormKernelArgs& args, const at::opmath_type<scalar_t>* lines, double* sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChannelLayout& lay = args.layout;
  const int64_t C = lay.channels, G = lay.groups;
  const bool channels_inner = lay.inner == 1;
  // Units: rows of C channels, or runs of one channel; per group.
  const int64_t units = channels_inner ? lay.outer : lay.outer * C;
  const int64_t numel = lay.outer * C * lay.inner;
  const int64_t max_blocks = std::clamp<int64_t>(kPartialBudget / (Op::kSums * C * G), 1, kMaxBlocks);
  // Blocks per group.
  const int64_t blocks =
      std::max<int64_t>(std::min(reduction_blocks(ceil_div(numel, kBlockElements), max_blocks), units), 1);
  const int64_t group_stride = group_line_stride<Op::kRows>(args);
  const int64_t sums_size = Op::kSums * C;
  // Block k's runs (or rows) [u0, u1), and the channels they reach.
  const auto block_units = [&](int64_t k) -> std::pair<int64_t, int64_t> {
    const int64_t g = k / blocks, b = k % blocks;
    return {g * units + b * units / blocks, g * units + (b + 1) * units / blocks};
  };
  const auto block_channels = [&](int64_t k) {
    const auto [u0, u1] = block_units(k);
    return channels_inner ? ChannelSpan::all(C) : ChannelSpan::of_runs(C, u0, u1);
  };
  double* partial = thread_scratch<double>(kPartialsSlot, G * blocks * sums_size);
  at::parallel_for(0, G * blocks, 1, [&](int64_t kb, int64_t ke) {
    const int64_t acc_size = Op::kSums * args.padded_channels;
    opmath_t* acc = channels_inner ? thread_scratch<opmath_t>(kAccumulatorSlot, acc_size) : nullptr;
    if (channels_inner) {
      std::fill(acc, acc + acc_size, opmath_t(0));
    }
    for (int64_t k = kb; k < ke; ++k) {
      const auto [u0, u1] = block_units(k);
      const auto* group_lines = lines + (k / blocks) * group_stride;
      double* own = partial + k * sums_size;
      block_channels(k).clear(own, Op::kSums);
      if (channels_inner) {
        reduce_block_channels_inner<scalar_t, Op, kStore>(args, group_lines, u0, u1, acc, own);
      } else {
        reduce_block_channel_runs<scalar_t, Op, kStore>(args, group_lines, u0, u1, own);
      }
    }
  });
  std::fill(sums, sums + G * sums_size, 0.0);
  at::parallel_for(0, C, kGrainElements / (Op::kSums * blocks * G) + 1, [&](int64_t c0, int64_t c1) {
    for (int64_t g = 0; g < G; ++g) {
      double* group_sums = sums + g * sums_size;
      for (int64_t k = g * blocks; k < (g + 1) * blocks; ++k) {
        const double* own = partial + k * sums_size;
        block_channels(k).within(c0, c1, [&](int64_t lo, int64_t hi) {
          for (const auto s : c10::irange(Op::kSums)) {
            add_into(group_sums + s * C + lo, own + s * C + lo, hi - lo);
          }
        });
      }
    }
  });
  if constexpr (Op::kUnscaledG >= 0) {
    using VL = Lines<opmath_t, Op::kRows>;
    scale_by_d_squared(sums + Op::kUnscaledG * C, G, sums_size, C, [&](int64_t g, int64_t c) {
      return static_cast<double>(lines[g * group_stride + Op::kDRow * VL::kLine + VL::index(c)]);
    });
  }
}

// The kRows per-channel rows (C doubles each) as Lines in opmath precision,
// in the calling thread's scratch, padding zero: one set, or one per group
// (group_line_stride apart) where some rows differ per group.
template <typename opmath_t, int kRows>
const opmath_t* value_lines(const NormKernelArgs& args) {
  using VL = Lines<opmath_t, kRows>;
  const int64_t C = args.layout.channels;
  const int64_t sets = args.grouped_rows != 0 ? args.layout.groups : 1;
  const int64_t stride = kRows * args.padded_channels;
  opmath_t* lines = thread_scratch<opmath_t>(kLinesSlot, sets * stride);
  std::fill(lines, lines + sets * stride, opmath_t(0));
  for (int64_t g = 0; g < sets; ++g) {
    for (const auto k : c10::irange(kRows)) {
      const double* row = args.values[k] + ((args.grouped_rows >> k) & 1 ? g * C : 0);
      opmath_t* line = lines + g * stride + k * VL::kLine;
      for (int64_t c = 0; c < C; ++c) {
        line[VL::index(c)] = static_cast<opmath_t>(row[c]);
      }
    }
  }
  return lines;
}

template <typename Op>
void run_map(const NormKernelArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "batch_norm_acon_c_cpu", [&] {
    map_channels<scalar_t, Op>(args, value_lines<at::opmath_type<scalar_t>, Op::kRows>(args));
  });
}

template <typename Op>
void run_reduce(const NormKernelArgs& args, double* sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "batch_norm_acon_c_sums_cpu", [&] {
    const auto* lines = value_lines<at::opmath_type<scalar_t>, Op::kRows>(args);
    if (args.out != nullptr) {
      reduce_channels<scalar_t, Op, true>(args, lines, sums);
    } else {
      reduce_channels<scalar_t, Op, false>(args, lines, sums);
    }
  });
}

} // namespace

void batch_norm_moments_kernel(const NormKernelArgs& args, double* sums) {
  run_reduce<ShiftedMoments>(args, sums);
}

void batch_norm_acon_c_forward_kernel(const NormKernelArgs& args) {
  run_map<NormAconCValue>(args);
}

void batch_norm_acon_c_grad_sums_kernel(const NormKernelArgs& args, double* sums) {
  run_reduce<NormAconCGradTerms>(args, sums);
}

void batch_norm_grad_from_dz_kernel(const NormKernelArgs& args) {
  run_map<NormGradFromDz>(args);
}

} // namespace acon_cuda::cpu::CPU_CAPABILITY
