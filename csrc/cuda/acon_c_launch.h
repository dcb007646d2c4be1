// The CUDA ops' host side, shared by the GPU (acon_c_cuda.cu) and the
// emulation (acon_c_emulation.cpp): which kernel runs, the launch plan (work
// split, grid), the workspace and the parameter gradients' tensors. A Runner
// does the launches: on the GPU's current stream, or on the CPU block by
// block. Forward: one kernel. Backward: the main kernel and
// reduce_channel_sums, with one workspace allocation (the partials).
#pragma once

#include "../acon_c.h"
#include "acon_c_kernel.cuh"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace acon_cuda::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

// Elements a pack of a main kernel moves: 16 bytes, except the 16-bit
// backward's 8 (4 channels a thread instead of 8: their 24 parameters and
// sums in registers made 108-121 registers a thread, 2 blocks a
// multiprocessor).
constexpr int pack_width(int element_size, bool backward) {
  return (backward && element_size == 2 ? 8 : 16) / element_size;
}

template <typename scalar_t, bool kBackward>
constexpr int kPackWidth = pack_width(sizeof(scalar_t), kBackward);

// Which main kernel runs, from the layout and the data's alignment.
struct KernelChoice {
  bool runs;   // else columns
  int width;   // elements per pack: `vector`, or 1
  bool ragged; // runs of a length that is not a multiple of width
};

inline KernelChoice choose_kernel(const ChannelLayout& layout, int vector, bool aligned) {
  KernelChoice k{};
  k.runs = layout.inner > 1;
  const bool whole = aligned && (k.runs ? layout.inner : layout.channels) % vector == 0;
  // Runs of other lengths: aligned windows, partial at the ends of each run
  // (worth it from two vectors a run on).
  k.ragged = k.runs && aligned && !whole && layout.inner >= 2 * vector;
  k.width = whole || k.ragged ? vector : 1;
  return k;
}

// The widest tile (a power of two up to kThreads vectors) that wastes the
// fewest threads on channels past C.
inline int choose_tile_vectors(int64_t channel_vectors) {
  if (channel_vectors < 32) {
    return static_cast<int>(pow2_at_least(channel_vectors));
  }
  int best = 32;
  for (int t = 64; t <= kThreads; t *= 2) {
    if (ceil_div(channel_vectors, t) * t <= ceil_div(channel_vectors, best) * best) {
      best = t;
    }
  }
  return best;
}

// The main kernel's work split. Items are dealt to teams (runs: `team` lanes
// of a warp; columns: the whole block), teams_per_block of them per block
// per turn. The grid is the fewest blocks that take the items in `turns`
// turns, turns being what the resident blocks need: every block but the
// last does the same number of items, with no half-empty last wave.
struct MainPlan : WorkSplit {
  int teams_per_block;
  int64_t turns, grid;
};

// Chunks per unit (a line or a column tile): as many as make about two
// turns of the resident teams without going over, within [min_chunks,
// max_chunks] (min_chunks wins).
inline int64_t balanced_chunks(int64_t units, int64_t slots, int64_t min_chunks, int64_t max_chunks) {
  const int64_t wanted = 2 * slots / units;
  return std::max<int64_t>({1, min_chunks, std::min(max_chunks, wanted)});
}

// `sums`: the kernel adds the parameter sums (a backward with parameter
// gradients), whose opmath accumulation bounds a thread's rows per chunk.
inline MainPlan plan_main(const ChannelLayout& layout, const KernelChoice& kernel, int64_t resident_blocks, bool sums) {
  MainPlan p{};
  const int w = kernel.width;
  int64_t units, length; // length: windows per line (runs), rows (columns)
  if (kernel.runs) {
    // A run of `inner` elements overlaps at most this many aligned windows.
    p.row_vectors = kernel.ragged ? (layout.inner + 2 * w - 2) / w : layout.inner / w;
    length = layout.outer * p.row_vectors;
    units = layout.groups * layout.channels;
    p.team = static_cast<int>(std::min<int64_t>(kWarpSize, pow2_at_least(length)));
    p.teams_per_block = kThreads / p.team;
    // Chunks of at least 8 windows a lane.
    const int64_t max_chunks = std::max<int64_t>(1, length / (8 * p.team));
    p.chunks = balanced_chunks(units, resident_blocks * p.teams_per_block, 1, max_chunks);
    p.step_rows = p.team / p.row_vectors;
    p.step_vectors = p.team % p.row_vectors;
  } else {
    const int64_t channel_vectors = layout.channels / w;
    p.tile_vectors = choose_tile_vectors(channel_vectors);
    p.tiles = ceil_div(channel_vectors, p.tile_vectors);
    length = layout.outer;
    units = layout.groups * p.tiles;
    p.team = kThreads;
    p.teams_per_block = 1;
    // With sums, a thread adds at most kFlushIterations of its rows in
    // opmath_t; without, chunks need only balance the work. A thread takes at
    // least one row.
    const int64_t row_step = kThreads / p.tile_vectors;
    const int64_t min_chunks = sums ? ceil_div(length, row_step * kFlushIterations) : 1;
    p.chunks = balanced_chunks(units, resident_blocks, min_chunks, std::max<int64_t>(1, length / row_step));
  }
  p.chunk_len = ceil_div(length, p.chunks);
  p.chunks = ceil_div(length, p.chunk_len);
  p.items = units * p.chunks;
  const int64_t block_items = ceil_div(p.items, p.teams_per_block);
  p.turns = ceil_div(block_items, resident_blocks);
  p.grid = ceil_div(block_items, p.turns);
  return p;
}

// reduce_channel_sums's shape: per region, lanes enough that no lane adds
// more than ~16 rows, up to 64 lanes a unit (then 4 units a block: their
// rows are 32-byte sectors).
struct ReducePlan {
  ReduceRegion ab, g;
  int64_t grid;
};

inline ReduceRegion reduce_region(int64_t first_unit, int64_t units, int64_t rows, int64_t first_block) {
  ReduceRegion r{};
  r.first_unit = first_unit;
  r.end_unit = first_unit + units;
  r.first_block = first_block;
  r.lanes_y = static_cast<int>(std::min<int64_t>(64, pow2_at_least(ceil_div(rows, 16))));
  r.units_x = kThreads / r.lanes_y;
  return r;
}

inline ReducePlan plan_reduce(const ChannelLayout& layout, int64_t chunks, int64_t beta_numel) {
  ReducePlan p{};
  const int64_t C = layout.channels;
  p.ab = reduce_region(0, C, layout.groups * chunks, 0);
  const int64_t ab_blocks = ceil_div(C, p.ab.units_x);
  p.g = reduce_region(C, beta_numel, chunks, ab_blocks);
  p.grid = ab_blocks + ceil_div(beta_numel, p.g.units_x);
  return p;
}

template <int kWidth, bool kRuns, bool kRagged>
struct KernelKind {
  static constexpr int width = kWidth;
  static constexpr bool runs = kRuns;
  static constexpr bool ragged = kRagged;
};

// Calls f(KernelKind<...>{}) for the kernel `k` names.
template <typename scalar_t, bool kBackward, typename F>
void with_kernel_kind(const KernelChoice& k, F&& f) {
  constexpr int kVector = kPackWidth<scalar_t, kBackward>;
  if (k.runs) {
    if (k.ragged) {
      f(KernelKind<kVector, true, true>{});
    } else if (k.width > 1) {
      f(KernelKind<kVector, true, false>{});
    } else {
      f(KernelKind<1, true, false>{});
    }
  } else if (k.width > 1) {
    f(KernelKind<kVector, false, false>{});
  } else {
    f(KernelKind<1, false, false>{});
  }
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename scalar_t>
bool args_aligned(const KernelArgs<scalar_t>& args, int64_t bytes) {
  return is_aligned(args.x, bytes) && is_aligned(args.out, bytes) &&
      (args.grad_y == nullptr || is_aligned(args.grad_y, bytes));
}

// Parameters in opmath_t: float, double for float64 x.
inline at::Tensor as_opmath(const at::Tensor& p, const at::Tensor& x) {
  return values_in(p, opmath_dtype(x));
}

// Runs the main kernel (forward when grad_y is undefined), and for the
// backward the reduce, which writes param_grads (grad_p1, grad_p2,
// grad_beta; none: no reduce).
template <typename Runner>
void run_acon_c(
    Runner& runner,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    const at::Tensor& grad_y,
    const std::vector<at::Tensor>& param_grads) {
  const WorkTensors w = make_work_tensors(out, x, beta, cdim, grad_y);
  const bool backward = grad_y.defined();
  const at::Tensor p1o = as_opmath(p1, x), p2o = as_opmath(p2, x), betao = as_opmath(beta, x);

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
    const auto run = [&](auto backward_tag) {
      constexpr bool kBackward = decltype(backward_tag)::value;
      constexpr int kVector = kPackWidth<scalar_t, kBackward>;
      const KernelChoice choice = choose_kernel(w.layout, kVector, args_aligned(args, kVector * sizeof(scalar_t)));
      with_kernel_kind<scalar_t, kBackward>(choice, [&](auto kind) {
        using Kind = decltype(kind);
        const bool sums = kBackward && !param_grads.empty();
        const MainPlan plan =
            plan_main(w.layout, choice, runner.template resident_blocks<scalar_t, Kind, kBackward>(), sums);
        static_cast<WorkSplit&>(args) = plan;
        // The workspace, where parameter gradients are asked for (the
        // kernels skip their sums without it).
        at::Tensor partials;
        if (sums) {
          partials = at::empty({3 * args.groups * args.chunks * args.channels}, x.options().dtype(at::kDouble));
          args.partials = partials.mutable_data_ptr<double>();
        }
        runner.template main<scalar_t, Kind, kBackward>(args, plan.grid);
        if (kBackward && !param_grads.empty()) {
          const ReducePlan rp = plan_reduce(w.layout, args.chunks, beta.numel());
          ReduceArgs<scalar_t> r{};
          r.partials = args.partials;
          r.groups = args.groups;
          r.chunks = args.chunks;
          r.channels = args.channels;
          r.ab = rp.ab;
          r.g = rp.g;
          r.grad_p1 = param_grads[0].data_ptr();
          r.grad_p2 = param_grads[1].data_ptr();
          r.grad_beta = param_grads[2].data_ptr();
          // A parameter not in x's dtype is float32 (check_acon_c_args).
          r.p1_float = param_grads[0].scalar_type() != x.scalar_type();
          r.p2_float = param_grads[1].scalar_type() != x.scalar_type();
          r.beta_float = param_grads[2].scalar_type() != x.scalar_type();
          runner.template reduce<scalar_t>(r, rp.grid);
        }
        // `partials` is freed here; the caching allocator keeps its block
        // for this stream, so work queued on it stays safe.
      });
    };
    if (backward) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  if (!w.out.is_same(out)) {
    out.copy_(w.out);
  }
}

template <typename Runner>
at::Tensor acon_c_forward_on(
    Runner& runner,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim) {
  at::Tensor y = at::empty_like(x);
  if (x.numel() > 0) {
    run_acon_c(runner, y, x, p1, p2, beta, cdim, at::Tensor(), {});
  }
  return y;
}

// grad_x and the parameter gradients, each in its parameter's dtype and
// shape. Outputs output_mask leaves out are empty tensors; without
// parameter gradients the reduce does not run.
template <typename Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_on(
    Runner& runner,
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t cdim,
    std::array<bool, 2> output_mask) {
  if (!output_mask[0] && !output_mask[1]) {
    return {masked_out_grad(x), masked_out_grad(p1), masked_out_grad(p2), masked_out_grad(beta)};
  }
  at::Tensor grad_x = at::empty_like(x);
  std::vector<at::Tensor> grads;
  for (const at::Tensor* p : {&p1, &p2, &beta}) {
    if (output_mask[1]) {
      // Zeros for an empty x, whose sums are zero; the reduce writes every
      // entry otherwise.
      grads.push_back(x.numel() > 0 ? at::empty(p->sizes(), p->options()) : at::zeros(p->sizes(), p->options()));
    }
  }
  if (x.numel() > 0) {
    run_acon_c(runner, grad_x, x, p1, p2, beta, cdim, grad_y, grads);
  }
  if (!output_mask[0]) {
    grad_x = masked_out_grad(x);
  }
  if (!output_mask[1]) {
    return {grad_x, masked_out_grad(p1), masked_out_grad(p2), masked_out_grad(beta)};
  }
  return {grad_x, grads[0], grads[1], grads[2]};
}

} // namespace acon_cuda::cuda
