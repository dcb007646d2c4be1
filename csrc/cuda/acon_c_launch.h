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
  int64_t workspace_doubles; // the backward's partials (0: no sums)
};

// Chunks per unit (a line or a column tile): as many as make about two
// turns of the resident teams without going over, within [min_chunks,
// max_chunks] (min_chunks wins).
inline int64_t balanced_chunks(int64_t units, int64_t slots, int64_t min_chunks, int64_t max_chunks) {
  const int64_t wanted = 2 * slots / units;
  return std::max<int64_t>({1, min_chunks, std::min(max_chunks, wanted)});
}

// An item moves at least this many bytes (x, grad_y, and dx when asked for)
// per byte of partial sums it writes: the workspace is at most 4% of the
// backward's traffic, except where a whole line (a channel of one group, or
// of the tensor) moves less than that; then it is one slot a line.
constexpr int64_t kTrafficPerWorkspaceByte = 25;

// The fewest elements an item with `sums` float64 partials per channel
// takes of each channel.
inline int64_t min_item_elements(int sums, int64_t bytes_per_element) {
  return ceil_div(kTrafficPerWorkspaceByte * sums * static_cast<int64_t>(sizeof(double)), bytes_per_element);
}

// How a per-sample beta's items hold whole groups, `line` elements of each
// (one chunk a line, so beta_direct): span groups an item, enough that its
// two sums stay within the bound.
inline void plan_whole_groups(MainPlan& p, const ChannelLayout& layout, int64_t line, int64_t bytes_per_element) {
  p.chunks = 1;
  p.span = std::min(layout.groups, std::max<int64_t>(1, ceil_div(min_item_elements(2, bytes_per_element), line)));
}

// The share of a main kernel's thread slots that hold work: per item, its
// windows (runs) or rows (columns) over the team's lanes or the block's
// thread rows, times (columns) the share of the tile's channels that exist.
inline double busy_share(const MainPlan& p, const ChannelLayout& layout, const KernelChoice& kernel) {
  const auto slots = [](int64_t n, int64_t width) { return ceil_div(n, width) * width; };
  const auto chunked = [&](int64_t length, int64_t width) {
    const int64_t last = length - (p.chunks - 1) * p.chunk_len;
    return static_cast<double>(length) / ((p.chunks - 1) * slots(p.chunk_len, width) + slots(last, width));
  };
  if (kernel.runs) {
    return chunked(layout.outer * p.row_vectors, p.team);
  }
  const double channel_share = static_cast<double>(layout.channels / kernel.width) / (p.tiles * p.tile_vectors);
  if (p.span > 1 || p.group_lanes > 1) { // whole groups: each piece's group lanes walk their groups' rows
    const int64_t thread_rows = p.pieces * p.group_lanes * slots(layout.outer, p.row_lanes);
    return channel_share * static_cast<double>(p.span * layout.outer) / thread_rows;
  }
  return channel_share * chunked(layout.outer, p.row_lanes);
}

// `sums`: the kernel adds the parameter sums (a backward with parameter
// gradients): their opmath accumulation bounds a columns thread's rows per
// item, and their workspace bounds the items' count. `streams`: the tensors
// of x's size the kernel moves (x, grad_y, and grad_x where asked for).
inline MainPlan plan_main(
    const ChannelLayout& layout,
    const KernelChoice& kernel,
    int64_t resident_blocks,
    bool sums,
    int64_t element_size,
    int streams) {
  MainPlan p{};
  const int64_t bytes_per_element = streams * element_size;
  const int w = kernel.width;
  p.span = 1;
  p.group_lanes = 1;
  const int64_t line = layout.outer * layout.inner; // a channel's elements in one group
  // Chunks a line may be cut into with three sums an item.
  const int64_t max_chunks_for_workspace =
      sums ? std::max<int64_t>(1, line / min_item_elements(3, bytes_per_element)) : line;
  const bool whole_groups = sums && layout.per_sample_beta && max_chunks_for_workspace == 1;
  int64_t length; // windows per line (runs), rows (columns)
  if (kernel.runs) {
    // A run of `inner` elements overlaps at most this many aligned windows.
    p.row_vectors = kernel.ragged ? (layout.inner + 2 * w - 2) / w : layout.inner / w;
    length = layout.outer * p.row_vectors;
    p.team = static_cast<int>(std::min<int64_t>(kWarpSize, pow2_at_least(length)));
    p.teams_per_block = kThreads / p.team;
    p.step_rows = p.team / p.row_vectors;
    p.step_vectors = p.team % p.row_vectors;
    if (whole_groups) {
      plan_whole_groups(p, layout, line, bytes_per_element);
    } else {
      // Chunks of at least 8 windows a lane.
      const int64_t max_chunks = std::min(max_chunks_for_workspace, std::max<int64_t>(1, length / (8 * p.team)));
      p.chunks = balanced_chunks(layout.groups * layout.channels, resident_blocks * p.teams_per_block, 1, max_chunks);
    }
    p.chunk_len = ceil_div(length, p.chunks);
    p.chunks = ceil_div(length, p.chunk_len);
    p.pieces = p.span;
  } else {
    const int64_t channel_vectors = layout.channels / w;
    length = layout.outer;
    p.team = kThreads;
    p.teams_per_block = 1;
    // Of the tiles from the widest down to 32 bytes (a sector a row), the
    // one whose items keep the most threads busy (busy_share) while there
    // are items for every resident block. Where sums are kept, a thread adds
    // at most kFlushIterations rows of an item in opmath_t, which rules out
    // the tiles whose rows a turn (kThreads / tile) times kFlushIterations
    // do not reach an item's rows.
    const int64_t narrowest = std::max<int64_t>(1, 32 / (w * element_size));
    double best = -1.0;
    for (int tile = choose_tile_vectors(channel_vectors);; tile /= 2) {
      MainPlan q = p;
      q.tile_vectors = tile;
      q.tiles = ceil_div(channel_vectors, tile);
      const int row_step = kThreads / tile;
      bool fits;
      if (whole_groups) {
        plan_whole_groups(q, layout, line, bytes_per_element);
        q.chunk_len = layout.outer;
        q.row_lanes = static_cast<int>(std::min<int64_t>(row_step, pow2_at_least(layout.outer)));
        q.group_lanes = row_step / q.row_lanes;
        const int64_t piece_rows = ceil_div(layout.outer, q.row_lanes); // a thread's, per piece
        fits = piece_rows <= kFlushIterations;
        q.pieces = std::min(ceil_div(q.span, q.group_lanes), std::max<int64_t>(1, kFlushIterations / piece_rows));
        q.span = std::min(layout.groups, q.pieces * q.group_lanes);
        q.pieces = ceil_div(q.span, q.group_lanes);
      } else {
        q.row_lanes = row_step;
        q.pieces = 1;
        const int64_t max_chunks = std::min(max_chunks_for_workspace, std::max<int64_t>(1, length / row_step));
        const int64_t min_chunks = sums ? ceil_div(length, row_step * kFlushIterations) : 1;
        fits = min_chunks <= max_chunks;
        q.chunks = balanced_chunks(layout.groups * q.tiles, resident_blocks, min_chunks, max_chunks);
        // Whole turns of the thread rows (the bound above still holds).
        q.chunk_len = ceil_div(ceil_div(length, q.chunks), row_step) * row_step;
        q.chunks = ceil_div(length, q.chunk_len);
      }
      q.items = ceil_div(layout.groups, q.span) * q.chunks * q.tiles;
      const bool last = tile / 2 < narrowest;
      if (fits || (last && best < 0)) {
        const double score =
            busy_share(q, layout, kernel) * std::min(1.0, static_cast<double>(q.items) / resident_blocks);
        if (score > best * (1 + 1e-9)) { // a tie keeps the wider tile
          p = q;
          best = score;
        }
      }
      if (last) {
        break;
      }
    }
  }
  p.beta_direct = sums && layout.per_sample_beta && p.chunks == 1;
  p.slots = ceil_div(layout.groups, p.span) * p.chunks;
  p.items = p.slots * (kernel.runs ? layout.channels : p.tiles);
  const int64_t block_items = ceil_div(p.items, p.teams_per_block);
  p.turns = ceil_div(block_items, resident_blocks);
  p.grid = ceil_div(block_items, p.turns);
  p.workspace_doubles = sums ? (p.beta_direct ? 2 : 3) * p.slots * layout.channels : 0;
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

// With beta_direct the main kernel wrote beta's gradients: no G units.
inline ReducePlan plan_reduce(const ChannelLayout& layout, const WorkSplit& split, int64_t beta_numel) {
  ReducePlan p{};
  const int64_t C = layout.channels;
  const int64_t g_units = split.beta_direct ? 0 : beta_numel;
  p.ab = reduce_region(0, C, split.slots, 0);
  const int64_t ab_blocks = ceil_div(C, p.ab.units_x);
  p.g = reduce_region(C, g_units, split.chunks, ab_blocks);
  p.grid = ab_blocks + ceil_div(g_units, p.g.units_x);
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
  return is_aligned(args.x, bytes) && (args.out == nullptr || is_aligned(args.out, bytes)) &&
      (args.grad_y == nullptr || is_aligned(args.grad_y, bytes));
}

// The tensors of x's size a call moves: x, grad_y for a backward, and its
// output unless a backward leaves grad_x out.
inline int moved_streams(bool backward, bool writes_out) {
  return (backward ? 2 : 1) + (writes_out ? 1 : 0);
}

// Parameters in opmath_t: float, double for float64 x.
inline at::Tensor as_opmath(const at::Tensor& p, const at::Tensor& x) {
  return values_in(p, opmath_dtype(x));
}

// Runs the main kernel (forward when grad_y is undefined), and for the
// backward the reduce, which writes param_grads (grad_p1, grad_p2,
// grad_beta; none: no reduce). `out` undefined: a backward without grad_x.
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
  const WorkTensors w = make_work_tensors(out.defined() ? out : x, x, beta, cdim, grad_y);
  const bool backward = grad_y.defined();
  const at::Tensor p1o = as_opmath(p1, x), p2o = as_opmath(p2, x), betao = as_opmath(beta, x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "acon_c_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    KernelArgs<scalar_t> args{};
    args.x = w.x.const_data_ptr<scalar_t>();
    args.grad_y = backward ? w.grad_y.const_data_ptr<scalar_t>() : nullptr;
    args.out = out.defined() ? w.out.mutable_data_ptr<scalar_t>() : nullptr;
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
      const bool sums = kBackward && !param_grads.empty();
      const bool aligned = args_aligned(args, kVector * sizeof(scalar_t));
      const KernelChoice choice = choose_kernel(w.layout, kVector, aligned);
      with_kernel_kind<scalar_t, kBackward>(choice, [&](auto kind) {
        using Kind = decltype(kind);
        const int64_t resident = runner.template resident_blocks<scalar_t, Kind, kBackward>();
        const MainPlan plan = plan_main(
            w.layout, choice, resident, sums, sizeof(scalar_t), moved_streams(kBackward, args.out != nullptr));
        static_cast<WorkSplit&>(args) = plan;
        // The workspace, where parameter gradients are asked for (the
        // kernels skip their sums without it).
        at::Tensor partials;
        if (sums) {
          partials = at::empty({plan.workspace_doubles}, x.options().dtype(at::kDouble));
          args.partials = partials.mutable_data_ptr<double>();
          // A parameter not in x's dtype is float32 (check_acon_c_args).
          args.grad_beta = param_grads[2].data_ptr();
          args.beta_float = param_grads[2].scalar_type() != x.scalar_type();
        }
        runner.template main<scalar_t, Kind, kBackward>(args, plan.grid);
        if (sums) {
          const ReducePlan rp = plan_reduce(w.layout, plan, beta.numel());
          ReduceArgs<scalar_t> r{};
          r.partials = args.partials;
          r.slots = args.slots;
          r.chunks = args.chunks;
          r.channels = args.channels;
          r.ab = rp.ab;
          r.g = rp.g;
          r.grad_p1 = param_grads[0].data_ptr();
          r.grad_p2 = param_grads[1].data_ptr();
          r.grad_beta = param_grads[2].data_ptr();
          r.p1_float = param_grads[0].scalar_type() != x.scalar_type();
          r.p2_float = param_grads[1].scalar_type() != x.scalar_type();
          r.beta_float = args.beta_float;
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
  if (out.defined() && !w.out.is_same(out)) {
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
  // Without grad_x the kernel stores nothing but the sums.
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : at::Tensor();
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
