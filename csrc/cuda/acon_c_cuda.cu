// CUDA implementations of the acon ops; the twin of csrc/cpu/acon_c_cpu.cpp.
// Argument checks and the [groups, outer, channels, inner] layout come from
// acon_c.h, so both devices accept and reject the same inputs.
//
// Two kernel shapes, as on the CPU:
// - runs (inner > 1, e.g. NCHW): a block takes one channel and a chunk of its
//   runs of `inner` elements; the channel's parameters are read once per
//   block and its sums are reduced with warp shuffles.
// - columns (inner == 1: channels_last, features-last): a block takes a tile
//   of channels and a chunk of rows; each thread keeps its channels'
//   parameters in registers over all its rows, and the block sums each
//   channel's column in shared memory.
// The backward writes each block's sums to its own slot of a partials tensor,
// and reduce_channel_sums adds the slots in a fixed order: no atomics, so the
// gradients are bit-identical from run to run on a given GPU.
#include "../acon_c.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace acon_cuda::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A thread adds at most this many loop iterations of terms in opmath
// precision before they move to double: bounds float32 accumulation error.
constexpr int kFlushIterations = 16;

// ---------------------------------------------------------------------------
// Elementwise math, in opmath_t (float for float16/bfloat16/float32, double
// for float64). Written as the CPU kernels write it (acon_c_kernel_impl.h).
// Everything from here to the kernels is __host__ __device__: the tests run
// the same per-thread code on the CPU (emulate_runs, emulate_columns).

#define ACON_HD __host__ __device__ __forceinline__

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
template <typename T>
ACON_HD void sigmoid_pair(T u, T& s, T& s_neg) {
  const T t = exp_of(-abs_of(u));
  const T r = T(1) / (T(1) + t); // sigmoid(|u|)
  const T q = t * r;             // sigmoid(-|u|)
  const bool nonneg = u >= T(0);
  s = nonneg ? r : q;
  s_neg = nonneg ? q : r;
}

// y = d*x*S + p2*x with u = bd*x, written x*(d*S + p2) like the reference.
template <typename T>
ACON_HD T acon_c_value(T x, T d, T p2, T bd) {
  T s, s_neg;
  sigmoid_pair(bd * x, s, s_neg);
  return x * fma_of(d, s, p2);
}

// dx, and adds this element's terms of the three parameter sums.
template <typename T>
ACON_HD T acon_c_grad(T x, T dy, T d, T p2, T bd, T& a, T& b, T& g) {
  const T u = bd * x;
  T s, s_neg;
  sigmoid_pair(u, s, s_neg);
  const T h = s * fma_of(u, s_neg, T(1));
  const T dyx = dy * x;
  const T dxd = d * x;
  a += dyx * h;
  b += dyx;
  // (d*x) * ((d*x)*S*(1-S)): no (d*x)^2 that could overflow on its own.
  g += (dy * dxd) * (dxd * (s * s_neg));
  return dy * fma_of(d, h, p2);
}

// kWidth elements moved as one aligned load or store (16 bytes when kWidth > 1).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

template <typename T, int kWidth>
ACON_HD Pack<T, kWidth> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kWidth>*>(p);
}

template <typename T, int kWidth>
ACON_HD void store_pack(T* p, const Pack<T, kWidth>& v) {
  *reinterpret_cast<Pack<T, kWidth>*>(p) = v;
}

// ---------------------------------------------------------------------------
// What every kernel gets. x, grad_y and out are contiguous in the layout
// order [groups, outer, channels, inner] (acon_c.h).

template <typename scalar_t>
struct KernelArgs {
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
  // Work items: groups x chunks x (channels for runs, column tiles for
  // columns). A chunk is chunk_rows consecutive values of the outer index.
  int64_t chunks, chunk_rows, items;
  // runs: `inner` as vectors, and how far (rows, vectors) a block-wide step
  // of kThreads vectors moves.
  int64_t row_vectors, step_rows, step_vectors;
  // columns: column tiles of tile_vectors vectors (a power of two <= kThreads).
  int64_t tiles;
  int tile_vectors;
  // Backward: partials[((s * groups + g) * chunks + chunk) * channels + c]
  // holds sum s (0: a, 1: b, 2: g) of one work item, channel c.
  double* partials;

  ACON_HD double* partial(int s, int64_t g, int64_t chunk, int64_t c) const {
    return partials + ((s * groups + g) * chunks + chunk) * channels + c;
  }
};

// A work item's place: group, chunk of the outer index, and channel (runs)
// or column tile (columns), from the item number; `minor` is C or tiles.
struct Item {
  int64_t g, chunk, minor;
  int64_t o0, rows; // the chunk's first outer index and its length
};

template <typename scalar_t>
ACON_HD Item locate(const KernelArgs<scalar_t>& args, int64_t item, int64_t minor_count) {
  Item it;
  it.minor = item % minor_count;
  it.chunk = (item / minor_count) % args.chunks;
  it.g = item / minor_count / args.chunks;
  it.o0 = it.chunk * args.chunk_rows;
  it.rows = min_of(args.chunk_rows, args.outer - it.o0);
  return it;
}

// Computes kUnroll packs of kWidth elements, pack i starting at element
// offset[i] (16-byte aligned when kWidth > 1), of which lanes [lo[i], hi[i])
// are this work's: all or none, except where kRagged (runs that do not start
// on a vector boundary, whose first and last packs are partial). Loads all
// packs first (kUnroll loads in flight), computes y or dx, adds the
// backward's terms to the sums and stores. A pack holds one channel
// (kChannels = 1: runs) or kWidth channels (kChannels = kWidth: columns);
// lane j uses channel j % kChannels's parameters and sums.
template <typename scalar_t, int kWidth, int kUnroll, int kChannels, bool kBackward, bool kRagged>
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
  using P = Pack<scalar_t, kWidth>;
  P xs[kUnroll], dys[kUnroll];
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    if (hi[i] - lo[i] == kWidth) {
      xs[i] = load_pack<scalar_t, kWidth>(args.x + offset[i]);
      if constexpr (kBackward) {
        dys[i] = load_pack<scalar_t, kWidth>(args.grad_y + offset[i]);
      }
    } else if (kRagged) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        if (lo[i] <= j && j < hi[i]) {
          xs[i].v[j] = args.x[offset[i] + j];
          if constexpr (kBackward) {
            dys[i].v[j] = args.grad_y[offset[i] + j];
          }
        }
      }
    }
  }
  const auto lane = [&](int i, int j) -> scalar_t {
    const opmath_t xv = static_cast<opmath_t>(xs[i].v[j]);
    const int k = j % kChannels;
    if constexpr (kBackward) {
      const opmath_t dy = static_cast<opmath_t>(dys[i].v[j]);
      return static_cast<scalar_t>(acon_c_grad(xv, dy, d[k], p2[k], bd[k], a[k], b[k], gs[k]));
    } else {
      return static_cast<scalar_t>(acon_c_value(xv, d[k], p2[k], bd[k]));
    }
  };
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) {
    if (hi[i] - lo[i] == kWidth) {
      P out;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        out.v[j] = lane(i, j);
      }
      store_pack<scalar_t, kWidth>(args.out + offset[i], out);
    } else if (kRagged) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        if (lo[i] <= j && j < hi[i]) {
          args.out[offset[i] + j] = lane(i, j);
        }
      }
    }
  }
}

// One thread's share of a runs work item (inner > 1): the item's (row,
// pack) pairs are dealt to the block's threads round-robin, so that short
// runs (7x7) keep every thread busy too. Packs are kWidth elements of the
// row; with kRagged they are the kWidth-aligned windows that overlap the row
// (row_vectors of them per row, the first and last possibly partial), so
// that runs of any length get 16-byte accesses. The backward adds the
// thread's terms to `sums` (a, b, g), in opmath_t for at most
// kFlushIterations iterations at a time, then in double.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
ACON_HD void runs_thread(const KernelArgs<scalar_t>& args, const Item& it, int thread, double (&sums)[3]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kWidth > 1 ? 2 : 4; // independent loads in flight
  const int64_t C = args.channels;
  const int64_t c = it.minor;
  const int64_t row_stride = C * args.inner;
  const int64_t base = ((it.g * args.outer + it.o0) * C + c) * args.inner;
  // The channel's parameters, once per item: every thread reads the same
  // addresses (one broadcast load each).
  const opmath_t p2[1] = {args.p2[c]};
  const opmath_t d[1] = {args.p1[c] - p2[0]};
  const opmath_t bd[1] = {args.beta[args.per_sample_beta ? it.g * C + c : c] * d[0]};
  opmath_t a[1] = {0}, b[1] = {0}, gs[1] = {0};

  int iterations = 0;
  int64_t r = thread / args.row_vectors;
  int64_t v = thread % args.row_vectors;
  while (r < it.rows) {
    int64_t offset[kUnroll];
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int64_t row_start = base + r * row_stride;
      lo[i] = hi[i] = 0;
      if constexpr (kRagged) {
        offset[i] = (row_start / kWidth + v) * kWidth;
        if (r < it.rows) {
          lo[i] = static_cast<int>(min_of<int64_t>(max_of<int64_t>(row_start - offset[i], 0), kWidth));
          hi[i] = static_cast<int>(max_of<int64_t>(min_of<int64_t>(row_start + args.inner - offset[i], kWidth), lo[i]));
        }
      } else {
        offset[i] = row_start + v * kWidth;
        hi[i] = r < it.rows ? kWidth : 0;
      }
      r += args.step_rows;
      v += args.step_vectors;
      if (v >= args.row_vectors) {
        v -= args.row_vectors;
        ++r;
      }
    }
    compute_packs<scalar_t, kWidth, kUnroll, 1, kBackward, kRagged>(args, offset, lo, hi, d, p2, bd, a, b, gs);
    if constexpr (kBackward) {
      if (++iterations == kFlushIterations || r >= it.rows) {
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
// backward's terms go to a, b, gs per channel, in opmath_t: plan_chunks
// bounds a thread's rows to kFlushIterations.
template <typename scalar_t, int kWidth, bool kBackward>
ACON_HD void columns_thread(
    const KernelArgs<scalar_t>& args,
    const Item& it,
    int thread,
    at::opmath_type<scalar_t> (&a)[kWidth],
    at::opmath_type<scalar_t> (&b)[kWidth],
    at::opmath_type<scalar_t> (&gs)[kWidth]) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kWidth > 1 ? 2 : 4;
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
  const int64_t base = (it.g * args.outer + it.o0) * C + c0;
  const opmath_t* beta = args.beta + (args.per_sample_beta ? it.g * C : 0);
  opmath_t d[kWidth], p2[kWidth], bd[kWidth];
#pragma unroll
  for (int j = 0; j < kWidth; ++j) {
    p2[j] = args.p2[c0 + j];
    d[j] = args.p1[c0 + j] - p2[j];
    bd[j] = beta[c0 + j] * d[j];
  }

  for (int64_t r = ty; r < it.rows; r += kUnroll * row_step) {
    int64_t offset[kUnroll];
    int lo[kUnroll], hi[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      offset[i] = base + (r + i * row_step) * C;
      lo[i] = 0;
      hi[i] = r + i * row_step < it.rows ? kWidth : 0;
    }
    compute_packs<scalar_t, kWidth, kUnroll, kWidth, kBackward, false>(args, offset, lo, hi, d, p2, bd, a, b, gs);
  }
}

// Sum j of [A (C), B (C), G (groups * C)] from the partials: A and B add
// every group's and chunk's, G every chunk's of its group; in a fixed order.
ACON_HD double channel_sum(const double* partials, int64_t j, int64_t groups, int64_t chunks, int64_t channels) {
  const int64_t c = j % channels;
  const int64_t s = min_of<int64_t>(j / channels, 2);
  const int64_t g_first = s < 2 ? 0 : j / channels - 2;
  const int64_t g_end = s < 2 ? groups : g_first + 1;
  double total = 0.0;
  for (int64_t g = g_first; g < g_end; ++g) {
    const double* p = partials + ((s * groups + g) * chunks) * channels + c;
    for (int64_t k = 0; k < chunks; ++k) {
      total += p[k * channels];
    }
  }
  return total;
}

// ---------------------------------------------------------------------------
// The kernels: the per-thread parts above, plus the block reductions.

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums each of v[0..2] over the block, in a fixed order; thread 0 gets the
// result. `scratch` holds kWarps * 3 doubles.
__device__ __forceinline__ void block_sum3(double (&v)[3], double* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    v[i] = warp_sum(v[i]);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      scratch[warp * 3 + i] = v[i];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      v[i] = warp_sum(lane < kWarps ? scratch[lane * 3 + i] : 0.0);
    }
  }
  __syncthreads(); // scratch is reused by the block's next work item
}

// Runs of one channel (inner > 1); see runs_thread.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
__global__ void __launch_bounds__(kThreads) acon_c_runs_kernel(const KernelArgs<scalar_t> args) {
  __shared__ double scratch[kWarps * 3];
  for (int64_t item = blockIdx.x; item < args.items; item += gridDim.x) {
    const Item it = locate(args, item, args.channels);
    double sums[3] = {0.0, 0.0, 0.0};
    runs_thread<scalar_t, kWidth, kBackward, kRagged>(args, it, threadIdx.x, sums);
    if constexpr (kBackward) {
      block_sum3(sums, scratch);
      if (threadIdx.x == 0) {
        for (int s = 0; s < 3; ++s) {
          *args.partial(s, it.g, it.chunk, it.minor) = sums[s];
        }
      }
    }
  }
}

// Channels innermost (inner == 1); see columns_thread. The backward sums each
// channel's column over the block's rows in shared memory, in double.
template <typename scalar_t, int kWidth, bool kBackward>
__global__ void __launch_bounds__(kThreads) acon_c_columns_kernel(const KernelArgs<scalar_t> args) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Per-thread column sums, one of a, b, g at a time.
  __shared__ double column_sums[kBackward ? kThreads * kWidth : 1];
  const int tile_vectors = args.tile_vectors;
  const int ty = threadIdx.x / tile_vectors;
  const int row_step = kThreads / tile_vectors;

  for (int64_t item = blockIdx.x; item < args.items; item += gridDim.x) {
    const Item it = locate(args, item, args.tiles);
    opmath_t a[kWidth], b[kWidth], gs[kWidth];
    columns_thread<scalar_t, kWidth, kBackward>(args, it, threadIdx.x, a, b, gs);
    if constexpr (kBackward) {
      const int64_t c0 = (it.minor * tile_vectors + threadIdx.x % tile_vectors) * kWidth;
      const auto reduce_column = [&](const opmath_t(&term)[kWidth], int s) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          column_sums[threadIdx.x * kWidth + j] = static_cast<double>(term[j]);
        }
        __syncthreads();
        for (int half = row_step / 2; half > 0; half /= 2) {
          if (ty < half) {
#pragma unroll
            for (int j = 0; j < kWidth; ++j) {
              column_sums[threadIdx.x * kWidth + j] += column_sums[(threadIdx.x + half * tile_vectors) * kWidth + j];
            }
          }
          __syncthreads();
        }
        if (ty == 0 && c0 < args.channels) {
#pragma unroll
          for (int j = 0; j < kWidth; ++j) {
            *args.partial(s, it.g, it.chunk, c0 + j) = column_sums[threadIdx.x * kWidth + j];
          }
        }
        __syncthreads();
      };
      reduce_column(a, 0);
      reduce_column(b, 1);
      reduce_column(gs, 2);
    }
  }
}

__global__ void reduce_channel_sums(
    const double* partials,
    double* sums,
    int64_t groups,
    int64_t chunks,
    int64_t channels) {
  const int64_t n = (2 + groups) * channels;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sums[j] = channel_sum(partials, j, groups, chunks, channels);
  }
}

// The same work on the CPU, block by block and thread by thread, for the
// tests (torch.ops.acon.cuda_kernels_on_cpu): it checks the indexing and the
// arithmetic of the kernels without a GPU. Block sums are taken in another
// order than on the GPU; the warp and barrier code itself is not covered.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
void emulate_runs(const KernelArgs<scalar_t>& args, int64_t grid) {
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t item = block; item < args.items; item += grid) {
      const Item it = locate(args, item, args.channels);
      double total[3] = {0.0, 0.0, 0.0};
      for (int thread = 0; thread < kThreads; ++thread) {
        double sums[3] = {0.0, 0.0, 0.0};
        runs_thread<scalar_t, kWidth, kBackward, kRagged>(args, it, thread, sums);
        for (int s = 0; s < 3; ++s) {
          total[s] += sums[s];
        }
      }
      if (kBackward) {
        for (int s = 0; s < 3; ++s) {
          *args.partial(s, it.g, it.chunk, it.minor) = total[s];
        }
      }
    }
  }
}

template <typename scalar_t, int kWidth, bool kBackward>
void emulate_columns(const KernelArgs<scalar_t>& args, int64_t grid) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t tile_channels = args.tile_vectors * kWidth;
  std::vector<double> column(3 * tile_channels);
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t item = block; item < args.items; item += grid) {
      const Item it = locate(args, item, args.tiles);
      std::fill(column.begin(), column.end(), 0.0);
      for (int thread = 0; thread < kThreads; ++thread) {
        opmath_t a[kWidth], b[kWidth], gs[kWidth];
        columns_thread<scalar_t, kWidth, kBackward>(args, it, thread, a, b, gs);
        const int64_t col = (thread % args.tile_vectors) * kWidth;
        for (int j = 0; j < kWidth; ++j) {
          column[col + j] += a[j];
          column[tile_channels + col + j] += b[j];
          column[2 * tile_channels + col + j] += gs[j];
        }
      }
      if (kBackward) {
        for (int64_t col = 0; col < tile_channels && it.minor * tile_channels + col < args.channels; ++col) {
          for (int s = 0; s < 3; ++s) {
            *args.partial(s, it.g, it.chunk, it.minor * tile_channels + col) = column[s * tile_channels + col];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The widest tile (a power of two up to kThreads vectors) that wastes the
// fewest threads on channels past C.
int choose_tile_vectors(int64_t channel_vectors) {
  if (channel_vectors < 32) {
    int t = 1;
    while (t < channel_vectors) {
      t *= 2;
    }
    return t;
  }
  int best = 32;
  for (int t = 64; t <= kThreads; t *= 2) {
    if (ceil_div(channel_vectors, t) * t <= ceil_div(channel_vectors, best) * best) {
      best = t;
    }
  }
  return best;
}

// Splits the outer index into chunks: enough work items to fill the GPU once
// (`blocks` resident blocks), and for the columns kernel few enough rows per
// thread that its opmath sums stay short.
template <typename scalar_t>
void plan_chunks(KernelArgs<scalar_t>& args, int64_t items_per_chunk, int64_t max_chunk_rows, int64_t blocks) {
  const int64_t per_chunk = args.groups * items_per_chunk;
  int64_t chunks = std::max(ceil_div(blocks, per_chunk), ceil_div(args.outer, max_chunk_rows));
  chunks = std::min(std::max<int64_t>(chunks, 1), args.outer);
  args.chunk_rows = ceil_div(args.outer, chunks);
  args.chunks = ceil_div(args.outer, args.chunk_rows);
  args.items = per_chunk * args.chunks;
}

bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Where the kernels run: on the current stream of x's GPU, or emulated on
// the CPU with a given GPU size (tests).
struct Target {
  bool emulate;
  int multiprocessors;
  int blocks_per_multiprocessor; // emulation; a GPU's comes from its occupancy
  cudaStream_t stream;
};

// What the launches ask of a GPU: its multiprocessor count, and how many
// blocks of a kernel fit on one multiprocessor. Both are fixed for a (kernel,
// device), so they are asked once, not on every call.
class DeviceQueries {
 public:
  static int multiprocessors(int device) {
    return cached({nullptr, device}, [&](int* out) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device));
    });
  }
  static int blocks_per_multiprocessor(const void* kernel, int device) {
    return cached({kernel, device}, [&](int* out) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, kThreads, 0));
    });
  }

 private:
  template <typename Query>
  static int cached(std::pair<const void*, int> key, Query query) {
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, int> values;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = values.find(key);
    if (found != values.end()) {
      return found->second;
    }
    int value = 0;
    query(&value);
    return values[key] = std::max(value, 1);
  }
};

Target gpu_target(const at::Tensor& x) {
  Target target{};
  target.multiprocessors = DeviceQueries::multiprocessors(x.get_device());
  target.stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  return target;
}

// Blocks of `kernel` resident on the whole device at once (the current
// device: the op's CUDAGuard made it x's).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, const Target& target) {
  const int per_multiprocessor = target.emulate
      ? target.blocks_per_multiprocessor
      : DeviceQueries::blocks_per_multiprocessor(reinterpret_cast<const void*>(kernel), c10::cuda::current_device());
  return static_cast<int64_t>(per_multiprocessor) * target.multiprocessors;
}

// Runs the forward (kBackward false) or backward kernel for x's layout and
// alignment; for the backward, fills the partial sums and returns them.
template <typename scalar_t, bool kBackward>
at::Tensor run_kernel(KernelArgs<scalar_t>& args, const at::TensorOptions& options, const Target& target) {
  constexpr int kVector = 16 / sizeof(scalar_t);
  const bool aligned =
      is_aligned(args.x, 16) && is_aligned(args.out, 16) && (!kBackward || is_aligned(args.grad_y, 16));
  const bool runs = args.inner > 1;
  const bool vector = aligned && (runs ? args.inner : args.channels) % kVector == 0;
  // Runs of other lengths: aligned windows, partial at the ends of each run
  // (worth it from two vectors a run on).
  const bool ragged = runs && aligned && !vector && args.inner >= 2 * kVector;

  auto start = [&](auto kernel, auto emulation, int width, bool windows) {
    const int64_t blocks = resident_blocks(kernel, target);
    if (runs) {
      // A run of `inner` elements overlaps at most this many aligned windows.
      args.row_vectors = windows ? (args.inner + 2 * width - 2) / width : args.inner / width;
      args.step_rows = kThreads / args.row_vectors;
      args.step_vectors = kThreads % args.row_vectors;
      plan_chunks(args, args.channels, args.outer, blocks);
    } else {
      args.tile_vectors = choose_tile_vectors(args.channels / width);
      args.tiles = ceil_div(args.channels / width, args.tile_vectors);
      const int64_t rows_per_pass = kThreads / args.tile_vectors;
      plan_chunks(args, args.tiles, rows_per_pass * kFlushIterations, blocks);
    }
    at::Tensor partials;
    if (kBackward) {
      partials = at::empty({3 * args.groups * args.chunks * args.channels}, options.dtype(at::kDouble));
      args.partials = partials.mutable_data_ptr<double>();
    }
    const int64_t grid = std::min(args.items, blocks);
    if (target.emulate) {
      emulation(args, grid);
    } else {
      kernel<<<static_cast<unsigned>(grid), kThreads, 0, target.stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return partials;
  };

  if (runs && vector) {
    return start(
        acon_c_runs_kernel<scalar_t, kVector, kBackward, false>,
        emulate_runs<scalar_t, kVector, kBackward, false>,
        kVector,
        false);
  }
  if (ragged) {
    return start(
        acon_c_runs_kernel<scalar_t, kVector, kBackward, true>,
        emulate_runs<scalar_t, kVector, kBackward, true>,
        kVector,
        true);
  }
  if (runs) {
    return start(
        acon_c_runs_kernel<scalar_t, 1, kBackward, false>, emulate_runs<scalar_t, 1, kBackward, false>, 1, false);
  }
  return vector
      ? start(
            acon_c_columns_kernel<scalar_t, kVector, kBackward>,
            emulate_columns<scalar_t, kVector, kBackward>,
            kVector,
            false)
      : start(acon_c_columns_kernel<scalar_t, 1, kBackward>, emulate_columns<scalar_t, 1, kBackward>, 1, false);
}

// Runs the forward (grad_y undefined) or the backward with x (and grad_y) in
// the layout of `out`; the backward writes its parameter sums into `sums`.
void launch(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    const at::Tensor& grad_y,
    const at::Tensor& sums,
    const Target& target) {
  const WorkTensors w = make_work_tensors(out, x, beta, cdim, grad_y);
  const bool backward = grad_y.defined();
  const at::ScalarType opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // No copies for the usual float32 (float64 for float64 x) parameters.
  const at::Tensor p1o = p1.reshape(-1).to(opmath).contiguous();
  const at::Tensor p2o = p2.reshape(-1).to(opmath).contiguous();
  const at::Tensor betao = beta.reshape(-1).to(opmath).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "acon_c_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    KernelArgs<scalar_t> args{};
    args.x = w.x.const_data_ptr<scalar_t>();
    args.grad_y = backward ? w.grad_y.const_data_ptr<scalar_t>() : nullptr;
    args.out = w.out.mutable_data_ptr<scalar_t>();
    args.p1 = p1o.const_data_ptr<opmath_t>();
    args.p2 = p2o.const_data_ptr<opmath_t>();
    args.beta = betao.const_data_ptr<opmath_t>();
    args.groups = w.layout.groups;
    args.outer = w.layout.outer;
    args.channels = w.layout.channels;
    args.inner = w.layout.inner;
    args.per_sample_beta = w.layout.per_sample_beta;
    if (!backward) {
      run_kernel<scalar_t, false>(args, x.options(), target);
      return;
    }
    const at::Tensor partials = run_kernel<scalar_t, true>(args, x.options(), target);
    const double* part = partials.const_data_ptr<double>();
    double* total = sums.mutable_data_ptr<double>();
    const int64_t n = sums.numel();
    if (target.emulate) {
      for (int64_t j = 0; j < n; ++j) {
        total[j] = channel_sum(part, j, args.groups, args.chunks, args.channels);
      }
      return;
    }
    const int64_t grid = std::min<int64_t>(ceil_div(n, kThreads), 4 * target.multiprocessors);
    reduce_channel_sums<<<static_cast<unsigned>(grid), kThreads, 0, target.stream>>>(
        part, total, args.groups, args.chunks, args.channels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!w.out.is_same(out)) {
    out.copy_(w.out);
  }
}

at::Tensor forward(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    const Target& target) {
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    launch(y, x, p1, p2, beta, cdim, at::Tensor(), at::Tensor(), target);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    const Target& target) {
  const int64_t C = x.size(cdim);
  at::Tensor grad_x = at::empty_like(x);
  // [A, B, G] as on the CPU (parameter_grads_from_sums); every entry is
  // written unless x is empty.
  const auto options = x.options().dtype(at::kDouble);
  at::Tensor sums =
      x.numel() > 0 ? at::empty({2 * C + beta.numel()}, options) : at::zeros({2 * C + beta.numel()}, options);
  if (x.numel() > 0) {
    launch(grad_x, x, p1, p2, beta, cdim, grad_y, sums, target);
  }
  auto [grad_p1, grad_p2, grad_beta] = parameter_grads_from_sums(sums, p1, p2, beta);
  return {grad_x, grad_p1, grad_p2, grad_beta};
}

at::Tensor acon_c_forward_cuda(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward(x, p1, p2, beta, cdim, gpu_target(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_cuda(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    std::array<bool, 2> output_mask) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [grad_x, grad_p1, grad_p2, grad_beta] = backward(grad_y, x, p1, p2, beta, cdim, gpu_target(x));
  // The kernels compute every output for now; masked ones are dropped
  // (skipping their work on the GPU is left to the CUDA redesign).
  if (!output_mask[0]) {
    grad_x = masked_out_grad(x);
  }
  if (!output_mask[1]) {
    grad_p1 = masked_out_grad(p1);
    grad_p2 = masked_out_grad(p2);
    grad_beta = masked_out_grad(beta);
  }
  return {grad_x, grad_p1, grad_p2, grad_beta};
}

// The test hooks: the CUDA kernels' code run on CPU tensors, as if on a GPU
// with `multiprocessors` multiprocessors holding `blocks_per_multiprocessor`
// blocks each.
Target emulated_target(int64_t multiprocessors, int64_t blocks_per_multiprocessor) {
  TORCH_CHECK_VALUE(
      multiprocessors >= 1 && blocks_per_multiprocessor >= 1 &&
          multiprocessors * blocks_per_multiprocessor <= (1 << 20),
      "acon_c emulation: multiprocessors and blocks_per_multiprocessor must be positive");
  Target target{};
  target.emulate = true;
  target.multiprocessors = static_cast<int>(multiprocessors);
  target.blocks_per_multiprocessor = static_cast<int>(blocks_per_multiprocessor);
  return target;
}

at::Tensor acon_c_forward_emulated(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    int64_t multiprocessors,
    int64_t blocks_per_multiprocessor) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim);
  return forward(x, p1, p2, beta, cdim, emulated_target(multiprocessors, blocks_per_multiprocessor));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_emulated(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    int64_t multiprocessors,
    int64_t blocks_per_multiprocessor) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y);
  return backward(grad_y, x, p1, p2, beta, cdim, emulated_target(multiprocessors, blocks_per_multiprocessor));
}

} // namespace
} // namespace acon_cuda::cuda

TORCH_LIBRARY_IMPL(acon, CUDA, m) {
  m.impl("acon_c_forward", &acon_cuda::cuda::acon_c_forward_cuda);
  m.impl("acon_c_backward", &acon_cuda::cuda::acon_c_backward_cuda);
}

// Test hooks (tests/test_cuda_emulation.py), in CUDA builds only: the CUDA
// kernels' per-thread code and work split, run on the CPU.
TORCH_LIBRARY_FRAGMENT(acon, m) {
  m.def(
      "_acon_c_forward_cuda_emulated(Tensor x, Tensor p1, Tensor p2, Tensor beta, int channel_dim, "
      "int multiprocessors, int blocks_per_multiprocessor) -> Tensor");
  m.def(
      "_acon_c_backward_cuda_emulated(Tensor grad_y, Tensor x, Tensor p1, Tensor p2, Tensor beta, "
      "int channel_dim, int multiprocessors, int blocks_per_multiprocessor) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("_acon_c_forward_cuda_emulated", &acon_cuda::cuda::acon_c_forward_emulated);
  m.impl("_acon_c_backward_cuda_emulated", &acon_cuda::cuda::acon_c_backward_emulated);
}
