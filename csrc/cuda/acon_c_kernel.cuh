// The CUDA kernels' code, written once for the GPU and for the emulation
// (acon_c_emulation.cpp), which runs it on the CPU:
// - per-thread code (runs_lane, columns_thread, the reduce's lanes), plain
//   __host__ __device__ functions;
// - each kernel's block-level steps (runs_block, columns_block,
//   reduce_block), written against a Block: the statements every thread of
//   a block runs (Block::threads), its barriers, team sums by warp shuffles
//   and shared memory (acon_c_block.h). The GPU's Block maps them to
//   threadIdx, __syncthreads, __shfl_down_sync and __shared__ arrays; the
//   emulation's runs the threads in lockstep between barriers and checks
//   every shared-memory access and shuffle.
// The launch plan and the host flow are in acon_c_launch.h.
//
// x, grad_y and out are contiguous in the layout order [groups, outer,
// channels, inner] (acon_c.h). Two kernel shapes, as on the CPU:
// - runs (inner > 1, e.g. NCHW): a team of 1-32 lanes of one warp takes one
//   work item of one channel: a chunk of a group's line (the group's runs of
//   `inner` elements one after the other, cut into windows of kWidth
//   elements), or the whole lines of `span` groups one after the other.
//   Short lines (7x7 maps) get a team as narrow as their window count,
//   several teams to a warp.
// - columns (inner == 1: channels_last, features-last): a block takes a tile
//   of channels and a chunk of rows (or `span` groups' rows); each thread
//   keeps its kWidth channels' parameters in registers over all its rows.
// The backward adds each work item's sums and writes them to the item's slot
// of a partials workspace; reduce_channel_sums (one more kernel) adds the
// slots in a fixed order and writes the parameter gradients. An item moves
// at least kTrafficPerWorkspaceByte bytes of data per workspace byte
// (acon_c_launch.h), and an item that holds whole groups of a per-sample
// beta writes beta's gradient itself. No atomics: the gradients are
// bit-identical from run to run on a given GPU.
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
// bits, so the kernels use the GPU's fast exp and reciprocal for them: with
// an accurate expf and an IEEE division, the sigmoid is most of the
// instructions of a 16-bit element. __expf is ex2.approx(v * log2(e)); on
// the host it is modelled as exp2f of the same rounded product (its main
// error, which grows with |v|), without ex2.approx's own ~2 ulp.
// rcp.approx.ftz.f32 is within 1 ulp of 1/v (one instruction; __frcp_rn's
// correct rounding takes a sequence); the host models it at that bound, 1/v
// rounded and moved one ulp towards zero. Its arguments are 1 + t, t in
// [0, 1]: never subnormal, so flushing them to zero changes nothing.
ACON_HD float fast_exp(float v) {
#ifdef __CUDA_ARCH__
  return __expf(v);
#else
  return exp2f(v * 1.44269504088896341f);
#endif
}

ACON_HD float fast_reciprocal(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return nextafterf(1.0f / v, 0.0f);
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
  // Work items: group blocks x chunks x units (channels for runs, column
  // tiles for columns), numbered with the last fastest. A group block is
  // `span` consecutive groups (the last may have fewer); an item takes the
  // same chunk of each, `pieces` steps of one group (runs) or group_lanes
  // groups (columns). span > 1 only with one chunk a line.
  // An item's slot in the workspace is its (group block, chunk): `slots` =
  // ceil(groups / span) * chunks rows of `channels` sums each.
  int64_t span, chunks, slots, items, pieces;
  // A per-sample beta whose items hold whole groups: each item writes its
  // groups' beta gradients itself, and its slot keeps two sums (a, b).
  bool beta_direct;
  // runs: a line (one group's runs of one channel) is outer * row_vectors
  // windows; a chunk is chunk_len of them. A team of `team` lanes moves
  // step_rows rows and step_vectors windows per step.
  // columns: a chunk is chunk_len rows; team is the whole block.
  int64_t chunk_len, row_vectors, step_rows, step_vectors;
  int team;
  // columns: column tiles of tile_vectors vectors (a power of two <=
  // kThreads). The kThreads / tile_vectors thread rows are group_lanes
  // lanes of row_lanes rows: thread row ty takes group ty / row_lanes of a
  // piece, and rows ty % row_lanes, + row_lanes, ... of it.
  int64_t tiles;
  int tile_vectors, group_lanes, row_lanes;
};

template <typename scalar_t>
struct KernelArgs : WorkSplit {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* grad_y; // backward only
  scalar_t* out;          // y, or grad_x (null: a backward without grad_x)
  // Contiguous, opmath_t: C values each; beta C per group (groups values of
  // C for a per-sample beta).
  const opmath_t* p1;
  const opmath_t* p2;
  const opmath_t* beta;
  int64_t groups, outer, channels, inner;
  bool per_sample_beta;
  // A backward with parameter gradients (null otherwise: no sums):
  // partials[(s * slots + slot) * channels + c] holds sum s (0: a, 1: b,
  // 2: g unless beta_direct) of one slot, channel c. With beta_direct,
  // grad_beta (float32 if beta_float, else scalar_t) gets each group's g.
  double* partials;
  void* grad_beta;
  bool beta_float;

  ACON_HD double* partial(int s, int64_t slot, int64_t c) const {
    return partials + (s * slots + slot) * channels + c;
  }
  ACON_HD int kept_sums() const {
    return beta_direct ? 2 : 3;
  }
};

// Writes a parameter gradient in its dtype: float32, or x's.
template <typename scalar_t>
ACON_HD void store_grad(void* to, bool as_float, int64_t i, double v) {
  if (as_float) {
    static_cast<float*>(to)[i] = static_cast<float>(v);
  } else {
    static_cast<scalar_t*>(to)[i] = static_cast<scalar_t>(v);
  }
}

// q = n / d and r = n % d (n >= 0, d > 0), in 32-bit arithmetic where both
// fit: a 64-bit division is a long instruction sequence on the GPU.
ACON_HD void div_mod(int64_t n, int64_t d, int64_t& q, int64_t& r) {
  if (((n | d) >> 31) == 0) {
    const uint32_t un = static_cast<uint32_t>(n), ud = static_cast<uint32_t>(d);
    const uint32_t uq = un / ud;
    q = uq;
    r = un - uq * ud;
  } else {
    q = n / d;
    r = n - q * d;
  }
}

// A work item's place: its slot and chunk, its first group, and its channel
// (runs) or column tile (columns), `minor` of `units`.
struct Item {
  int64_t slot, chunk, g0, minor;
};

ACON_HD Item locate(int64_t item, const WorkSplit& w, int64_t units) {
  Item it;
  div_mod(item, units, it.slot, it.minor);
  int64_t group_block;
  div_mod(it.slot, w.chunks, group_block, it.chunk);
  it.g0 = group_block * w.span;
  return it;
}

// Computes kUnroll packs of kWidth elements, pack i starting at element
// offset[i] (16-byte aligned when kWidth > 1), of which lanes [lo[i], hi[i])
// are this work's: all, none, or (runs that do not start on a vector
// boundary, kRagged) a part at the ends of a run. Loads every pack first
// (kUnroll loads in flight), the lanes outside [lo, hi) as zeros. A pack
// with work computes every lane the same way, so that a warp holding partial
// windows does not diverge: only the stores are masked (and skipped without
// an output), and the sums by a select (acon_c_grad); a pack without work
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
    if (args.out == nullptr) {
      continue;
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

// One lane's share of chunk `chunk` of group g's line of channel c (runs,
// inner > 1): windows [chunk * chunk_len, ...) of the line, the line being
// the group's rows one after the other, row_vectors windows each; lane l
// takes windows l, l + team, ... Windows are kWidth elements of the row;
// with kRagged they are the kWidth-aligned windows that overlap the row (the
// first and last possibly partial), so that runs of any length get 16-byte
// accesses. The backward adds the lane's terms to a_sum, b_sum, g_sum, in
// opmath_t for at most kFlushIterations iterations at a time, then in
// double.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
ACON_HD void runs_lane(
    const KernelArgs<scalar_t>& args,
    int64_t g,
    int64_t chunk,
    int64_t c,
    int lane,
    double& a_sum,
    double& b_sum,
    double& g_sum) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kUnrollPacks<scalar_t, kWidth>;
  const int64_t C = args.channels;
  const int64_t row_stride = C * args.inner;
  const int64_t base = (g * args.outer * C + c) * args.inner;
  // The channel's parameters, once per piece: the team's lanes read the same
  // addresses (one broadcast load each).
  const opmath_t p2[1] = {args.p2[c]};
  const opmath_t d[1] = {args.p1[c] - p2[0]};
  const opmath_t bd[1] = {args.beta[args.per_sample_beta ? g * C + c : c] * d[0]};
  opmath_t a[1] = {0}, b[1] = {0}, gs[1] = {0};

  const int64_t k_begin = chunk * args.chunk_len;
  const int64_t k_end = min_of(k_begin + args.chunk_len, args.outer * args.row_vectors);
  int64_t k = k_begin + lane;
  int64_t r, v;
  div_mod(k, args.row_vectors, r, v);
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
        a_sum += a[0];
        b_sum += b[0];
        g_sum += gs[0];
        a[0] = b[0] = gs[0] = 0;
        iterations = 0;
      }
    }
  }
}

// One thread's share of piece `piece` of a columns work item (inner == 1):
// thread (tx, ty) owns kWidth channels of the tile, keeps their parameters
// in registers and walks rows ty % row_lanes, + row_lanes, ... of its
// group's chunk. The backward adds its terms to a, b, gs per channel, in
// opmath_t: where they are kept (a backward with parameter gradients), the
// plan bounds a thread's rows per item to kFlushIterations.
template <typename scalar_t, int kWidth, bool kBackward>
ACON_HD void columns_thread(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    int64_t piece,
    int thread,
    at::opmath_type<scalar_t> (&a)[kWidth],
    at::opmath_type<scalar_t> (&b)[kWidth],
    at::opmath_type<scalar_t> (&gs)[kWidth]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kUnrollPacks<scalar_t, kWidth>;
  const int64_t C = args.channels;
  const int tx = thread % args.tile_vectors;
  const int ty = thread / args.tile_vectors;
  const int row_lanes = args.row_lanes;
  const int64_t g = it.g0 + piece * args.group_lanes + ty / row_lanes;
  const int64_t c0 = (it.minor * args.tile_vectors + tx) * kWidth;
  if (c0 >= C || g >= args.groups) { // past the last channel (C is a multiple of kWidth) or group
    return;
  }
  const int64_t o0 = it.chunk * args.chunk_len;
  const int64_t rows = min_of(args.chunk_len, args.outer - o0);
  const int64_t base = (g * args.outer + o0) * C + c0;
  const opmath_t* beta = args.beta + (args.per_sample_beta ? g * C : 0);
  opmath_t d[kWidth], p2[kWidth], bd[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    p2[j] = args.p2[c0 + j];
    d[j] = args.p1[c0 + j] - p2[j];
    bd[j] = beta[c0 + j] * d[j];
  }

  for (int64_t r = ty % row_lanes; r < rows; r += kUnroll * row_lanes) {
    int64_t offset[kUnroll];
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      offset[i] = base + (r + i * row_lanes) * C;
      lo[i] = 0;
      hi[i] = r + i * row_lanes < rows ? kWidth : 0;
    }
    compute_packs<scalar_t, kWidth, kUnroll, kWidth, kBackward>(args, offset, lo, hi, d, p2, bd, a, b, gs);
  }
}

// Where the columns backward stages sum s of a thread's channel j in shared
// memory: consecutive threads, consecutive words (no bank conflicts).
ACON_HD int staged_word(int s, int kWidth, int j, int thread) {
  return (s * kWidth + j) * kThreads + thread;
}

// Output o of a tile's kept_sums * tile_vectors * kWidth sums: adds its
// channel's staged values over the block's thread rows in double, in row
// order, and writes the item's slot. Outputs are numbered so that
// consecutive threads read consecutive words.
template <typename scalar_t, int kWidth, typename Shared>
ACON_HD void columns_block_sum(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    Shared& staged,
    int output,
    int thread) {
  const int tile_vectors = args.tile_vectors;
  const int row_step = kThreads / tile_vectors;
  const int s = output / (kWidth * tile_vectors);
  const int j = output / tile_vectors % kWidth;
  const int tx = output % tile_vectors;
  const int64_t c = (it.minor * tile_vectors + tx) * kWidth + j;
  if (c >= args.channels) {
    return;
  }
  double total = 0.0;
  for (int ty = 0; ty < row_step; ++ty) {
    total += static_cast<double>(staged.load(thread, staged_word(s, kWidth, j, ty * tile_vectors + tx)));
  }
  *args.partial(s, it.slot, c) = total;
}

// beta_direct, output o of a piece's group_lanes * tile_vectors * kWidth
// beta gradients: adds the staged g values of its group lane's row lanes
// and writes the gradient.
template <typename scalar_t, int kWidth, typename Shared>
ACON_HD void columns_group_beta(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    int64_t piece,
    Shared& staged,
    int output,
    int thread) {
  const int tile_vectors = args.tile_vectors;
  const int group_lane = output / (kWidth * tile_vectors);
  const int j = output / tile_vectors % kWidth;
  const int tx = output % tile_vectors;
  const int64_t c = (it.minor * tile_vectors + tx) * kWidth + j;
  const int64_t g = it.g0 + piece * args.group_lanes + group_lane;
  if (c >= args.channels || g >= args.groups) {
    return;
  }
  double total = 0.0;
  for (int row = 0; row < args.row_lanes; ++row) {
    const int ty = group_lane * args.row_lanes + row;
    total += static_cast<double>(staged.load(thread, staged_word(2, kWidth, j, ty * tile_vectors + tx)));
  }
  store_grad<scalar_t>(args.grad_beta, args.beta_float, g * args.channels + c, total);
}

// ---------------------------------------------------------------------------
// reduce_channel_sums: adds the partials, in a fixed order, and writes the
// parameter gradients dp1 = A, dp2 = B - A, dbeta = G (docs/math.md) in each
// parameter's dtype (x's, or float32).

// A part of the reduce's grid: units [first_unit, end_unit) (the (A, B)
// units, or the G units), units_x of them a block, lanes_y lanes each, from
// block first_block on. Each part has its own shape: an (A, B) unit adds
// every slot, a G unit only its group's chunks.
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
  int64_t slots, chunks, channels;
  // Units: C (A, B) units, then beta's G units (C, groups * C for a
  // per-sample beta, none with beta_direct).
  ReduceRegion ab, g;
  void* grad_p1;
  void* grad_p2;
  void* grad_beta;
  bool p1_float, p2_float, beta_float; // float32, else x's dtype

  ACON_HD const ReduceRegion& region(int64_t block) const {
    return block < g.first_block ? ab : g;
  }
};

// Where sum s of unit u lies: its first row and the row count; rows are
// `channels` apart.
template <typename scalar_t>
ACON_HD const double* unit_rows(const ReduceArgs<scalar_t>& args, int64_t u, int s, int64_t& rows) {
  const int64_t C = args.channels;
  if (u < C) {
    rows = args.slots;
    return args.partials + s * args.slots * C + u;
  }
  // G unit j: group j / C's chunks (one group for a per-channel beta).
  const int64_t j = u - C;
  rows = args.chunks;
  return args.partials + (2 * args.slots + j / C * args.chunks) * C + j % C;
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
    store_grad<scalar_t>(args.grad_p1, args.p1_float, u, total[0]);
    store_grad<scalar_t>(args.grad_p2, args.p2_float, u, total[1] - total[0]);
  } else {
    store_grad<scalar_t>(args.grad_beta, args.beta_float, u - args.channels, total[0]);
  }
}

// ---------------------------------------------------------------------------
// The kernels' block-level steps, against a Block (acon_c_block.h):
// - block.index(), block.count(): blockIdx.x, gridDim.x;
// - block.threads(f): every thread t of the block runs f(t) (on the GPU,
//   each thread its own; in the emulation, all of them, one after the
//   other). What a thread keeps from one step to the next is a
//   Block::Local<T> (a register value on the GPU, one per thread in the
//   emulation), indexed by t;
// - block.barrier(site): __syncthreads(); `site` names it for the
//   emulation's checks;
// - block.team_sum(local, team): adds a Local<DoubleSums<N>> over teams of
//   `team` lanes by __shfl_down_sync (lane 0 of each team gets the sum);
// - a Shared array (staged.load(t, i), staged.store(t, i, v)): __shared__
//   memory; the emulation checks every access between two barriers.
// Loops around barriers and team sums are block-uniform.

// The barriers, named for the emulation's checks (and its mutation tests).
enum BarrierSite : int {
  kSumsStaged = 1,
  kSumsRead = 2,
  kGroupSumsStaged = 3,
  kGroupSumsRead = 4,
  kLanesStaged = 5,
  kLanesAdded = 6,
};

template <int N>
struct DoubleSums {
  double v[N];
};

template <typename T, int kWidth>
struct ChannelSums {
  T a[kWidth], b[kWidth], g[kWidth];
};

// acon_c_runs_kernel: team t of the grid (team_in_block + teams_per_block
// * block) takes items t, t + teams in the grid, ... The block's teams take
// their turns together (an item past the end computes nothing but joins
// the team sums), so no lane leaves a shuffle early. No barriers, no shared
// memory.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged, typename Block>
ACON_HD void runs_block(const Block& block, const KernelArgs<scalar_t>& args) {
  const int team = args.team;
  const int64_t teams_per_block = kThreads / team;
  const int64_t stride = block.count() * teams_per_block;
  const bool sums_kept = kBackward && args.partials != nullptr;
  typename Block::template Local<DoubleSums<3>> sums;    // a, b and (unless beta_direct) g
  typename Block::template Local<DoubleSums<1>> group_g; // beta_direct: g of the piece's group
  for (int64_t first = block.index() * teams_per_block; first < args.items; first += stride) {
    // A thread's item is first + t / team; it is located again in each
    // step rather than kept (registers).
    block.threads([&](int t) { sums[t] = DoubleSums<3>{}; });
    for (int64_t piece = 0; piece < args.pieces; ++piece) {
      block.threads([&](int t) {
        const Item it = locate(first + t / team, args, args.channels);
        const int64_t g = it.g0 + piece;
        group_g[t] = DoubleSums<1>{};
        if (first + t / team < args.items && g < args.groups) {
          // g's sum in a value of its own: a reference chosen at run time
          // would put both sums in local memory.
          double g_sum = 0.0;
          runs_lane<scalar_t, kWidth, kBackward, kRagged>(
              args, g, it.chunk, it.minor, t % team, sums[t].v[0], sums[t].v[1], g_sum);
          if (args.beta_direct) {
            group_g[t].v[0] = g_sum;
          } else {
            sums[t].v[2] += g_sum;
          }
        }
      });
      if (sums_kept && args.beta_direct) {
        block.team_sum(group_g, team);
        block.threads([&](int t) {
          const Item it = locate(first + t / team, args, args.channels);
          const int64_t g = it.g0 + piece;
          if (t % team == 0 && first + t / team < args.items && g < args.groups) {
            store_grad<scalar_t>(args.grad_beta, args.beta_float, g * args.channels + it.minor, group_g[t].v[0]);
          }
        });
      }
    }
    if (sums_kept) {
      block.team_sum(sums, team);
      block.threads([&](int t) {
        const Item it = locate(first + t / team, args, args.channels);
        if (t % team == 0 && first + t / team < args.items) {
          // A constant trip count: v[] indexed by a run-time bound could go to local memory.
#pragma unroll
          for (int s = 0; s < 3; ++s) {
            if (s < args.kept_sums()) {
              *args.partial(s, it.slot, it.minor) = sums[t].v[s];
            }
          }
        }
      });
    }
  }
}

// acon_c_columns_kernel: block b takes items b, b + blocks, ... The
// backward stages each thread's opmath sums in shared memory and adds each
// channel's column of them (columns_block_sum): two barriers per item, and
// with beta_direct two more per piece for its groups' beta gradients.
template <typename scalar_t, int kWidth, bool kBackward, typename Block, typename Shared>
ACON_HD void columns_block(const Block& block, const KernelArgs<scalar_t>& args, Shared& staged) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool sums_kept = kBackward && args.partials != nullptr;
  typename Block::template Local<ChannelSums<opmath_t, kWidth>> sums;
  for (int64_t item = block.index(); item < args.items; item += block.count()) {
    const Item it = locate(item, args, args.tiles);
    block.threads([&](int t) { sums[t] = ChannelSums<opmath_t, kWidth>{}; });
    for (int64_t piece = 0; piece < args.pieces; ++piece) {
      block.threads([&](int t) {
        columns_thread<scalar_t, kWidth, kBackward>(args, it, piece, t, sums[t].a, sums[t].b, sums[t].g);
      });
      if (sums_kept && args.beta_direct) {
        block.threads([&](int t) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            staged.store(t, staged_word(2, kWidth, j, t), sums[t].g[j]);
            sums[t].g[j] = 0;
          }
        });
        block.barrier(kGroupSumsStaged);
        block.threads([&](int t) {
          for (int o = t; o < args.group_lanes * kWidth * args.tile_vectors; o += kThreads) {
            columns_group_beta<scalar_t, kWidth>(args, it, piece, staged, o, t);
          }
        });
        block.barrier(kGroupSumsRead); // the staged words are written again
      }
    }
    if (sums_kept) {
      block.threads([&](int t) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          staged.store(t, staged_word(0, kWidth, j, t), sums[t].a[j]);
          staged.store(t, staged_word(1, kWidth, j, t), sums[t].b[j]);
          if (!args.beta_direct) {
            staged.store(t, staged_word(2, kWidth, j, t), sums[t].g[j]);
          }
        }
      });
      block.barrier(kSumsStaged);
      block.threads([&](int t) {
        for (int o = t; o < args.kept_sums() * kWidth * args.tile_vectors; o += kThreads) {
          columns_block_sum<scalar_t, kWidth>(args, it, staged, o, t);
        }
      });
      block.barrier(kSumsRead); // the block's next item stages again
    }
  }
}

// reduce_channel_sums: a block is units_x units by lanes_y lanes of its
// region (reduce_lane), then a fixed shared-memory tree over the lanes
// (`lanes`: 2 * kThreads doubles).
template <typename scalar_t, typename Block, typename Shared>
ACON_HD void reduce_block(const Block& block, const ReduceArgs<scalar_t>& args, Shared& lanes) {
  const ReduceRegion& region = args.region(block.index());
  const int units_x = region.units_x;
  block.threads([&](int t) {
    double sums[2];
    reduce_lane(args, region.lanes_y, region.unit(block.index(), t % units_x), t / units_x, sums);
    lanes.store(t, t, sums[0]);
    lanes.store(t, kThreads + t, sums[1]);
  });
  block.barrier(kLanesStaged);
  for (int half = region.lanes_y / 2; half > 0; half /= 2) {
    block.threads([&](int t) {
      if (t / units_x < half) {
        for (int s = 0; s < 2; ++s) {
          const int w = s * kThreads + t;
          lanes.store(t, w, lanes.load(t, w) + lanes.load(t, w + half * units_x));
        }
      }
    });
    block.barrier(kLanesAdded);
  }
  block.threads([&](int t) {
    if (t / units_x == 0) {
      const double total[2] = {lanes.load(t, t), lanes.load(t, kThreads + t)};
      write_unit(args, region.unit(block.index(), t), total);
    }
  });
}

} // namespace acon_cuda::cuda
