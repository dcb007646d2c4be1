// The CUDA kernels' per-thread code: everything a thread computes, written
// __host__ __device__ so that the emulation (acon_c_emulation.cpp) runs the
// very same code on the CPU, thread by thread. The kernels themselves (warp
// shuffles, barriers) are in acon_c_cuda.cu; the launch plan and the host
// flow both share are in acon_c_launch.h.
//
// x, grad_y and out are contiguous in the layout order [groups, outer,
// channels, inner] (acon_c.h). Two kernel shapes, as on the CPU:
// - runs (inner > 1, e.g. NCHW): a team of 1-32 lanes of one warp takes one
//   work item, a chunk of one (group, channel) line: its runs of `inner`
//   elements one after the other, cut into windows of kWidth elements. Long
//   lines are cut into several chunks; short ones (7x7 maps with a
//   per-sample beta) get a team as narrow as their window count, several
//   teams to a warp.
// - columns (inner == 1: channels_last, features-last): a block takes a tile
//   of channels and a chunk of rows; each thread keeps its kWidth channels'
//   parameters in registers over all its rows.
// The backward writes each work item's three sums to its own slot of a
// partials workspace; reduce_channel_sums (one more kernel) adds the slots in
// a fixed order and writes the parameter gradients. No atomics: the gradients
// are bit-identical from run to run on a given GPU.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define ACON_HD __host__ __device__ __forceinline__
#else
#define ACON_HD inline
#endif

namespace acon_cuda::cuda {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
// A thread adds at most this many loop iterations of terms in opmath
// precision before they move to double: bounds float32 accumulation error.
constexpr int kFlushIterations = 16;

// ---------------------------------------------------------------------------
// Elementwise math, in opmath_t (float for float16/bfloat16/float32, double
// for float64), written as the CPU kernels write it (acon_c_kernel_impl.h).

ACON_HD float exp_of(float v) {
  return expf(v);
}
ACON_HD double exp_of(double v) {
  return exp(v);
}
ACON_HD float abs_of(float v) {
  return fabsf(v);
}
ACON_HD double abs_of(double v) {
  return fabs(v);
}
ACON_HD float fma_of(float a, float b, float c) {
  return fmaf(a, b, c);
}
ACON_HD double fma_of(double a, double b, double c) {
  return fma(a, b, c);
}

// 16-bit inputs and outputs carry 8 (bfloat16) or 11 (float16) significant
// bits, so the kernels may use the GPU's fast exp and reciprocal for them:
// with an accurate expf and an IEEE division, the sigmoid is most of the
// instructions of a 16-bit element. __expf is ex2.approx(v * log2(e)); on
// the host it is modelled as exp2f of the same rounded product (its main
// error, which grows with |v|), without ex2.approx's own ~2 ulp.
// __frcp_rn is correctly rounded, as the host's 1/v is.
ACON_HD float fast_exp(float v) {
#ifdef __CUDA_ARCH__
  return __expf(v);
#else
  return exp2f(v * 1.44269504088896341f);
#endif
}

ACON_HD float fast_reciprocal(float v) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(v);
#else
  return 1.0f / v;
#endif
}

template <typename scalar_t>
constexpr bool kFastMath = sizeof(scalar_t) == 2;

template <typename T>
ACON_HD T min_of(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
ACON_HD T max_of(T a, T b) {
  return a < b ? b : a;
}

// S = sigmoid(u) and s_neg = 1 - S = sigmoid(-u), both from t = exp(-|u|),
// which never overflows: no inf/inf, and 1 - S without cancellation. S is 0
// exactly at u = -inf and 1 at +inf, as torch.sigmoid gives; NaN stays NaN.
template <bool kFast, typename T>
ACON_HD void sigmoid_pair(T u, T& s, T& s_neg) {
  T t, r;
  if constexpr (kFast) {
    t = fast_exp(-abs_of(u));
    r = fast_reciprocal(T(1) + t); // sigmoid(|u|)
  } else {
    t = exp_of(-abs_of(u));
    r = T(1) / (T(1) + t);
  }
  const T q = t * r; // sigmoid(-|u|)
  const bool nonneg = u >= T(0);
  s = nonneg ? r : q;
  s_neg = nonneg ? q : r;
}

// y = d*x*S + p2*x with u = bd*x, written x*(d*S + p2) like the reference.
template <bool kFast, typename T>
ACON_HD T acon_c_value(T x, T d, T p2, T bd) {
  T s, s_neg;
  sigmoid_pair<kFast>(bd * x, s, s_neg);
  return x * fma_of(d, s, p2);
}

// dx; adds this element's terms to the three parameter sums when `in`
// (select, not branch: the zero-filled lanes of a partial window compute
// too, and a zero x with an infinite beta would add NaN). The fused
// multiply-adds are written out: the kernels are built with -fmad=false, so
// the GPU rounds as the host does.
template <bool kFast, typename T>
ACON_HD T acon_c_grad(T x, T dy, T d, T p2, T bd, bool in, T& a, T& b, T& g) {
  const T u = bd * x;
  T s, s_neg;
  sigmoid_pair<kFast>(u, s, s_neg);
  const T h = s * fma_of(u, s_neg, T(1));
  const T dyx = dy * x;
  const T dxd = d * x;
  const T a_next = fma_of(dyx, h, a);
  const T b_next = b + dyx;
  // (d*x) * ((d*x)*S*(1-S)): no (d*x)^2 that could overflow on its own.
  const T g_next = fma_of(dy * dxd, dxd * (s * s_neg), g);
  a = in ? a_next : a;
  b = in ? b_next : b;
  g = in ? g_next : g;
  return dy * fma_of(d, h, p2);
}

// kWidth elements moved as one aligned load or store (16 bytes when kWidth > 1).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

// Packs a thread loads before it computes: independent loads in flight. 4
// of the 16-bit backward's 8-byte packs spill at its 80 registers.
template <typename T, int kWidth>
constexpr int kUnrollPacks = kWidth > 1 ? 2 : 4;

template <typename T, int kWidth>
ACON_HD Pack<T, kWidth> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kWidth>*>(p);
}

template <typename T, int kWidth>
ACON_HD void store_pack(T* p, const Pack<T, kWidth>& v) {
  *reinterpret_cast<Pack<T, kWidth>*>(p) = v;
}

// ---------------------------------------------------------------------------
// What every main kernel gets: the tensors, the layout and the work split
// of the launch plan (acon_c_launch.h).

// The work split, as the plan makes it and the kernels read it.
struct WorkSplit {
  // Work items: groups x chunks x (channels for runs, column tiles for
  // columns), numbered with the last fastest.
  int64_t chunks, items;
  // runs: a line (one group's runs of one channel) is outer * row_vectors
  // windows; a chunk is chunk_len of them. A team of `team` lanes moves
  // step_rows rows and step_vectors windows per step.
  // columns: a chunk is chunk_len rows; team is the whole block.
  int64_t chunk_len, row_vectors, step_rows, step_vectors;
  int team;
  // columns: column tiles of tile_vectors vectors (a power of two <=
  // kThreads).
  int64_t tiles;
  int tile_vectors;
};

template <typename scalar_t>
struct KernelArgs : WorkSplit {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* grad_y; // backward only
  scalar_t* out;          // y, or grad_x
  // Contiguous, opmath_t: C values each; beta C per group (groups values of
  // C for a per-sample beta).
  const opmath_t* p1;
  const opmath_t* p2;
  const opmath_t* beta;
  int64_t groups, outer, channels, inner;
  bool per_sample_beta;
  // Backward: partials[((s * groups + g) * chunks + chunk) * channels + c]
  // holds sum s (0: a, 1: b, 2: g) of one work item, channel c; null: no
  // parameter gradients asked for, no sums.
  double* partials;

  ACON_HD double* partial(int s, int64_t g, int64_t chunk, int64_t c) const {
    return partials + ((s * groups + g) * chunks + chunk) * channels + c;
  }
};

// A work item's place: group, chunk and channel (runs) or column tile
// (columns), from the item number; `minor` is C or tiles.
struct Item {
  int64_t g, chunk, minor;
};

ACON_HD Item locate(int64_t item, int64_t chunks, int64_t minor_count) {
  Item it;
  it.minor = item % minor_count;
  it.chunk = (item / minor_count) % chunks;
  it.g = item / minor_count / chunks;
  return it;
}

// Computes kUnroll packs of kWidth elements, pack i starting at element
// offset[i] (16-byte aligned when kWidth > 1), of which lanes [lo[i], hi[i])
// are this work's: all, none, or (runs that do not start on a vector
// boundary, kRagged) a part at the ends of a run. Loads every pack first
// (kUnroll loads in flight), the lanes outside [lo, hi) as zeros. A pack
// with work computes every lane the same way, so that a warp holding partial
// windows does not diverge: only the stores are masked, and the sums by a
// select (acon_c_grad); a pack without work
// is skipped. A pack holds one channel (kChannels = 1: runs) or kWidth
// channels (kChannels = kWidth: columns); lane j uses channel j % kChannels's
// parameters and sums.
template <typename scalar_t, int kWidth, int kUnroll, int kChannels, bool kBackward>
ACON_HD void compute_packs(
    const KernelArgs<scalar_t>& args,
    const int64_t (&offset)[kUnroll],
    const int (&lo)[kUnroll],
    const int (&hi)[kUnroll],
    const at::opmath_type<scalar_t> (&d)[kChannels],
    const at::opmath_type<scalar_t> (&p2)[kChannels],
    const at::opmath_type<scalar_t> (&bd)[kChannels],
    at::opmath_type<scalar_t> (&a)[kChannels],
    at::opmath_type<scalar_t> (&b)[kChannels],
    at::opmath_type<scalar_t> (&gs)[kChannels]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kFast = kFastMath<scalar_t>;
  using P = Pack<scalar_t, kWidth>;
  P xs[kUnroll], dys[kUnroll];
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    if (hi[i] - lo[i] == kWidth) {
      xs[i] = load_pack<scalar_t, kWidth>(args.x + offset[i]);
      if constexpr (kBackward) {
        dys[i] = load_pack<scalar_t, kWidth>(args.grad_y + offset[i]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const bool in = lo[i] <= j && j < hi[i];
        xs[i].v[j] = in ? args.x[offset[i] + j] : scalar_t(0);
        if constexpr (kBackward) {
          dys[i].v[j] = in ? args.grad_y[offset[i] + j] : scalar_t(0);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    if (hi[i] <= lo[i]) {
      continue;
    }
    P out;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const opmath_t xv = static_cast<opmath_t>(xs[i].v[j]);
      const int k = j % kChannels;
      if constexpr (kBackward) {
        const opmath_t dy = static_cast<opmath_t>(dys[i].v[j]);
        const bool in = lo[i] <= j && j < hi[i];
        out.v[j] = static_cast<scalar_t>(acon_c_grad<kFast>(xv, dy, d[k], p2[k], bd[k], in, a[k], b[k], gs[k]));
      } else {
        out.v[j] = static_cast<scalar_t>(acon_c_value<kFast>(xv, d[k], p2[k], bd[k]));
      }
    }
    if (hi[i] - lo[i] == kWidth) {
      store_pack<scalar_t, kWidth>(args.out + offset[i], out);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        if (lo[i] <= j && j < hi[i]) {
          args.out[offset[i] + j] = out.v[j];
        }
      }
    }
  }
}

// One lane's share of a runs work item (inner > 1). The item is windows
// [chunk * chunk_len, ...) of its line, the line being the group's rows one
// after the other, row_vectors windows each; lane l takes windows l, l +
// team, ... Windows are kWidth elements of the row; with kRagged they are the
// kWidth-aligned windows that overlap the row (the first and last possibly
// partial), so that runs of any length get 16-byte accesses. The backward
// adds the lane's terms to `sums` (a, b, g), in opmath_t for at most
// kFlushIterations iterations at a time, then in double.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
ACON_HD void runs_lane(const KernelArgs<scalar_t>& args, const Item& it, int lane, double (&sums)[3]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kUnrollPacks<scalar_t, kWidth>;
  const int64_t C = args.channels;
  const int64_t c = it.minor;
  const int64_t row_stride = C * args.inner;
  const int64_t base = (it.g * args.outer * C + c) * args.inner;
  // The channel's parameters, once per item: the team's lanes read the same
  // addresses (one broadcast load each).
  const opmath_t p2[1] = {args.p2[c]};
  const opmath_t d[1] = {args.p1[c] - p2[0]};
  const opmath_t bd[1] = {args.beta[args.per_sample_beta ? it.g * C + c : c] * d[0]};
  opmath_t a[1] = {0}, b[1] = {0}, gs[1] = {0};

  const int64_t k_begin = it.chunk * args.chunk_len;
  const int64_t k_end = min_of(k_begin + args.chunk_len, args.outer * args.row_vectors);
  int64_t k = k_begin + lane;
  int64_t r = k / args.row_vectors;
  int64_t v = k % args.row_vectors;
  int iterations = 0;
  while (k < k_end) {
    int64_t offset[kUnroll];
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t row_start = base + r * row_stride;
      const bool valid = k < k_end;
      lo[i] = hi[i] = 0;
      if constexpr (kRagged) {
        offset[i] = (row_start / kWidth + v) * kWidth;
        if (valid) {
          lo[i] = static_cast<int>(min_of<int64_t>(max_of<int64_t>(row_start - offset[i], 0), kWidth));
          hi[i] = static_cast<int>(max_of<int64_t>(min_of<int64_t>(row_start + args.inner - offset[i], kWidth), lo[i]));
        }
      } else {
        offset[i] = row_start + v * kWidth;
        hi[i] = valid ? kWidth : 0;
      }
      k += args.team;
      r += args.step_rows;
      v += args.step_vectors;
      if (v >= args.row_vectors) {
        v -= args.row_vectors;
        ++r;
      }
    }
    compute_packs<scalar_t, kWidth, kUnroll, 1, kBackward>(args, offset, lo, hi, d, p2, bd, a, b, gs);
    if constexpr (kBackward) {
      if (++iterations == kFlushIterations || k >= k_end) {
        sums[0] += a[0];
        sums[1] += b[0];
        sums[2] += gs[0];
        a[0] = b[0] = gs[0] = 0;
        iterations = 0;
      }
    }
  }
}

// One thread's share of a columns work item (inner == 1): thread (tx, ty)
// owns kWidth channels of the tile, keeps their parameters in registers and
// walks rows ty, ty + kThreads / tile_vectors, ... of the chunk. The
// backward's terms go to a, b, gs per channel, in opmath_t: where they are
// kept (a backward with parameter gradients), the plan bounds a thread's
// rows to kFlushIterations.
template <typename scalar_t, int kWidth, bool kBackward>
ACON_HD void columns_thread(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    int thread,
    at::opmath_type<scalar_t> (&a)[kWidth],
    at::opmath_type<scalar_t> (&b)[kWidth],
    at::opmath_type<scalar_t> (&gs)[kWidth]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kUnrollPacks<scalar_t, kWidth>;
  const int64_t C = args.channels;
  const int tx = thread % args.tile_vectors;
  const int ty = thread / args.tile_vectors;
  const int row_step = kThreads / args.tile_vectors;
  const int64_t c0 = (it.minor * args.tile_vectors + tx) * kWidth;
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    a[j] = b[j] = gs[j] = 0;
  }
  if (c0 >= C) { // past the last channel (C is a multiple of kWidth)
    return;
  }
  const int64_t o0 = it.chunk * args.chunk_len;
  const int64_t rows = min_of(args.chunk_len, args.outer - o0);
  const int64_t base = (it.g * args.outer + o0) * C + c0;
  const opmath_t* beta = args.beta + (args.per_sample_beta ? it.g * C : 0);
  opmath_t d[kWidth], p2[kWidth], bd[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    p2[j] = args.p2[c0 + j];
    d[j] = args.p1[c0 + j] - p2[j];
    bd[j] = beta[c0 + j] * d[j];
  }

  for (int64_t r = ty; r < rows; r += kUnroll * row_step) {
    int64_t offset[kUnroll];
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      offset[i] = base + (r + i * row_step) * C;
      lo[i] = 0;
      hi[i] = r + i * row_step < rows ? kWidth : 0;
    }
    compute_packs<scalar_t, kWidth, kUnroll, kWidth, kBackward>(args, offset, lo, hi, d, p2, bd, a, b, gs);
  }
}

// The columns backward's block sum: each thread has stored its kWidth
// channels' three opmath sums in `column_sums` at [(s * kWidth + j) *
// kThreads + thread] (consecutive threads, consecutive words: no bank
// conflicts); output o of the tile's 3 * tile_vectors * kWidth adds its
// row_step values in double, rows in order. Outputs are numbered so that
// consecutive threads read consecutive words too.
template <typename scalar_t, int kWidth>
ACON_HD void columns_block_sum(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    const at::opmath_type<scalar_t>* column_sums,
    int output) {
  const int tile_vectors = args.tile_vectors;
  const int row_step = kThreads / tile_vectors;
  const int s = output / (kWidth * tile_vectors);
  const int j = output / tile_vectors % kWidth;
  const int tx = output % tile_vectors;
  const int64_t c = (it.minor * tile_vectors + tx) * kWidth + j;
  if (c >= args.channels) {
    return;
  }
  const at::opmath_type<scalar_t>* column = column_sums + (s * kWidth + j) * kThreads + tx;
  double total = 0.0;
  for (int ty = 0; ty < row_step; ++ty) {
    total += static_cast<double>(column[ty * tile_vectors]);
  }
  *args.partial(s, it.g, it.chunk, c) = total;
}

// ---------------------------------------------------------------------------
// reduce_channel_sums: adds the partials, in a fixed order, and writes the
// parameter gradients dp1 = A, dp2 = B - A, dbeta = G (docs/math.md) in each
// parameter's dtype (x's, or float32).

// A part of the reduce's grid: units [first_unit, end_unit) (the (A, B)
// units, or the G units), units_x of them a block, lanes_y lanes each, from
// block first_block on. Each part has its own shape: an (A, B) unit adds
// every group's chunks, a G unit only its group's.
struct ReduceRegion {
  int64_t first_unit, end_unit, first_block;
  int units_x, lanes_y;

  // The unit of lane column x in `block`, or -1 past the region's end.
  ACON_HD int64_t unit(int64_t block, int x) const {
    const int64_t u = first_unit + (block - first_block) * units_x + x;
    return u < end_unit ? u : -1;
  }
};

template <typename scalar_t>
struct ReduceArgs {
  const double* partials;
  int64_t groups, chunks, channels;
  // Units: C (A, B) units, then beta's G units (C, or groups * C).
  ReduceRegion ab, g;
  void* grad_p1;
  void* grad_p2;
  void* grad_beta;
  bool p1_float, p2_float, beta_float; // float32, else x's dtype

  ACON_HD const ReduceRegion& region(int64_t block) const {
    return block < g.first_block ? ab : g;
  }

  ACON_HD void write(void* to, bool as_float, int64_t i, double v) const {
    if (as_float) {
      static_cast<float*>(to)[i] = static_cast<float>(v);
    } else {
      static_cast<scalar_t*>(to)[i] = static_cast<scalar_t>(v);
    }
  }
};

// Where sum s of unit u lies: its first row and the row count; rows are
// `channels` apart.
template <typename scalar_t>
ACON_HD const double* unit_rows(const ReduceArgs<scalar_t>& args, int64_t u, int s, int64_t& rows) {
  const int64_t C = args.channels;
  if (u < C) {
    rows = args.groups * args.chunks;
    return args.partials + s * args.groups * args.chunks * C + u;
  }
  // G unit j: group j / C (groups is 1 for a per-channel beta).
  const int64_t j = u - C;
  rows = args.chunks;
  return args.partials + (2 * args.groups + j / C) * args.chunks * C + j % C;
}

// Lane y's share of one of unit u's sums (s: 0 A, 1 B, 2 G): rows y, y +
// lanes_y, ... in two alternating accumulators (two loads in flight per chain
// of adds).
template <typename scalar_t>
ACON_HD double reduce_lane_sum(const ReduceArgs<scalar_t>& args, int lanes_y, int64_t u, int s, int y) {
  int64_t rows;
  const double* p = unit_rows(args, u, s, rows);
  const int64_t step = lanes_y * args.channels;
  double even = 0.0, odd = 0.0;
  int64_t r = y;
  for (; r + lanes_y < rows; r += 2 * lanes_y) {
    even += p[r * args.channels];
    odd += p[r * args.channels + step];
  }
  if (r < rows) {
    even += p[r * args.channels];
  }
  return even + odd;
}

// Lane y's share of unit u (-1: none): A and B for an (A, B) unit, G and 0
// for a G unit.
template <typename scalar_t>
ACON_HD void reduce_lane(const ReduceArgs<scalar_t>& args, int lanes_y, int64_t u, int y, double (&sums)[2]) {
  const bool ab = 0 <= u && u < args.channels;
  sums[0] = u >= 0 ? reduce_lane_sum(args, lanes_y, u, ab ? 0 : 2, y) : 0.0;
  sums[1] = ab ? reduce_lane_sum(args, lanes_y, u, 1, y) : 0.0;
}

// Writes unit u's gradients (-1: none) from its totals.
template <typename scalar_t>
ACON_HD void write_unit(const ReduceArgs<scalar_t>& args, int64_t u, const double (&total)[2]) {
  if (u < 0) {
    return;
  }
  if (u < args.channels) {
    args.write(args.grad_p1, args.p1_float, u, total[0]);
    args.write(args.grad_p2, args.p2_float, u, total[1] - total[0]);
  } else {
    args.write(args.grad_beta, args.beta_float, u - args.channels, total[0]);
  }
}

} // namespace acon_cuda::cuda
