// Test hooks' kernels, in CUDA builds only (tests/test_cuda_emulation.py;
// the schemas, in every build, are in csrc/acon.cpp):
// - the CUDA ops run on CPU tensors, with the kernels' own per-thread code
//   (acon_c_kernel.cuh) and host flow (acon_c_launch.h), block by block and
//   thread by thread, as on a GPU of a given size. Warp shuffles and shared-
//   memory trees are replaced by loops that add in their order, and the
//   kernels are built with -fmad=false, so the sums are formed and added as
//   on the GPU. Results can still differ from the GPU's in the last bits:
//   CUDA's exp/expf and the host's may round differently, and 16-bit math
//   uses fast_exp's model. Barriers, races and the GPU's timing are not
//   covered.
// - the launch plan for a shape on a GPU of a given size.
#include "acon_c_launch.h"

#include <torch/library.h>

#include <array>
#include <vector>

namespace acon_cuda::cuda {
namespace {

// Lane 0's result of a shuffle-down tree over `team` lanes (team_sum3).
void tree_sum(std::vector<std::array<double, 3>>& lanes, int team) {
  for (int offset = team / 2; offset > 0; offset /= 2) {
    for (int l = 0; l < offset; ++l) {
      for (int s = 0; s < 3; ++s) {
        lanes[l][s] += lanes[l + offset][s];
      }
    }
  }
}

// acon_c_runs_kernel: team t of the grid takes items t, t + teams, ...
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
void emulate_runs(const KernelArgs<scalar_t>& args, int64_t grid) {
  const int team = args.team;
  const int64_t teams_per_block = kThreads / team;
  const int64_t stride = grid * teams_per_block;
  std::vector<std::array<double, 3>> lanes(team);
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t t = 0; t < teams_per_block; ++t) {
      for (int64_t item = block * teams_per_block + t; item < args.items; item += stride) {
        const Item it = locate(item, args.chunks, args.channels);
        for (int lane = 0; lane < team; ++lane) {
          double sums[3] = {0.0, 0.0, 0.0};
          runs_lane<scalar_t, kWidth, kBackward, kRagged>(args, it, lane, sums);
          lanes[lane] = {sums[0], sums[1], sums[2]};
        }
        if (kBackward && args.partials != nullptr) {
          tree_sum(lanes, team);
          for (int s = 0; s < 3; ++s) {
            *args.partial(s, it.g, it.chunk, it.minor) = lanes[0][s];
          }
        }
      }
    }
  }
}

// acon_c_columns_kernel.
template <typename scalar_t, int kWidth, bool kBackward>
void emulate_columns(const KernelArgs<scalar_t>& args, int64_t grid) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<opmath_t> column_sums(3 * kWidth * kThreads);
  const int outputs = 3 * kWidth * args.tile_vectors;
  for (int64_t block = 0; block < grid; ++block) {
    for (int64_t item = block; item < args.items; item += grid) {
      const Item it = locate(item, args.chunks, args.tiles);
      for (int thread = 0; thread < kThreads; ++thread) {
        opmath_t a[kWidth], b[kWidth], gs[kWidth];
        columns_thread<scalar_t, kWidth, kBackward>(args, it, thread, a, b, gs);
        for (int j = 0; j < kWidth; ++j) {
          column_sums[j * kThreads + thread] = a[j];
          column_sums[(kWidth + j) * kThreads + thread] = b[j];
          column_sums[(2 * kWidth + j) * kThreads + thread] = gs[j];
        }
      }
      if (kBackward && args.partials != nullptr) {
        for (int o = 0; o < outputs; ++o) {
          columns_block_sum<scalar_t, kWidth>(args, it, column_sums.data(), o);
        }
      }
    }
  }
}

// reduce_channel_sums.
template <typename scalar_t>
void emulate_reduce(const ReduceArgs<scalar_t>& args, int64_t grid) {
  std::vector<std::array<double, 2>> lanes(kThreads);
  for (int64_t block = 0; block < grid; ++block) {
    const ReduceRegion& region = args.region(block);
    const int units_x = region.units_x;
    for (int t = 0; t < kThreads; ++t) {
      double sums[2];
      reduce_lane(args, region.lanes_y, region.unit(block, t % units_x), t / units_x, sums);
      lanes[t] = {sums[0], sums[1]};
    }
    for (int half = region.lanes_y / 2; half > 0; half /= 2) {
      for (int t = 0; t < half * units_x; ++t) {
        lanes[t][0] += lanes[t + half * units_x][0];
        lanes[t][1] += lanes[t + half * units_x][1];
      }
    }
    for (int x = 0; x < units_x; ++x) {
      const double total[2] = {lanes[x][0], lanes[x][1]};
      write_unit(args, region.unit(block, x), total);
    }
  }
}

// A GPU of `multiprocessors` multiprocessors holding
// `blocks_per_multiprocessor` blocks of every kernel.
struct EmulatedRunner {
  int64_t multiprocessors, blocks_per_multiprocessor;

  template <typename scalar_t, typename Kind, bool kBackward>
  int64_t resident_blocks() const {
    return multiprocessors * blocks_per_multiprocessor;
  }

  template <typename scalar_t, typename Kind, bool kBackward>
  void main(const KernelArgs<scalar_t>& args, int64_t grid) const {
    if constexpr (Kind::runs) {
      emulate_runs<scalar_t, Kind::width, kBackward, Kind::ragged>(args, grid);
    } else {
      emulate_columns<scalar_t, Kind::width, kBackward>(args, grid);
    }
  }

  template <typename scalar_t>
  void reduce(const ReduceArgs<scalar_t>& args, int64_t grid) const {
    emulate_reduce(args, grid);
  }
};

EmulatedRunner emulated_runner(int64_t multiprocessors, int64_t blocks_per_multiprocessor) {
  TORCH_CHECK_VALUE(
      multiprocessors >= 1 && blocks_per_multiprocessor >= 1 &&
          multiprocessors * blocks_per_multiprocessor <= (1 << 20),
      "acon_c emulation: multiprocessors and blocks_per_multiprocessor must be positive");
  return {multiprocessors, blocks_per_multiprocessor};
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
  EmulatedRunner runner = emulated_runner(multiprocessors, blocks_per_multiprocessor);
  return acon_c_forward_on(runner, x, p1, p2, beta, cdim);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acon_c_backward_emulated(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim,
    int64_t multiprocessors,
    int64_t blocks_per_multiprocessor,
    std::array<bool, 2> output_mask) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim, grad_y);
  EmulatedRunner runner = emulated_runner(multiprocessors, blocks_per_multiprocessor);
  return acon_c_backward_on(runner, grad_y, x, p1, p2, beta, cdim, output_mask);
}

// Fraction (per mille) of the main kernel's lane slots that hold work: per
// item, `length` windows (runs) or rows (columns) over `width` lanes.
int64_t busy_permille(const MainPlan& p, int64_t length, int64_t width, double lane_share) {
  const auto slots = [&](int64_t n) { return ceil_div(n, width) * width; };
  const int64_t last = length - (p.chunks - 1) * p.chunk_len;
  const double busy = static_cast<double>(length) / ((p.chunks - 1) * slots(p.chunk_len) + slots(last));
  return static_cast<int64_t>(1000.0 * busy * lane_share);
}

// The kernels one call launches, 8 numbers each: kind (0 runs, 1 columns,
// 2 reduce), grid, threads per block, items (reduce: units), teams per block
// (reduce: units per block), the most items a block takes, busy lane slots
// per mille (reduce: the most partial sums one lane adds), and independent
// lanes (grid * threads; reduce: independent chains of adds).
std::vector<int64_t> acon_c_launch_plan(
    const at::Tensor& x,
    const at::Tensor& beta,
    int64_t channel_dim,
    bool backward,
    int64_t multiprocessors,
    int64_t blocks_per_multiprocessor) {
  TORCH_CHECK_VALUE(x.dim() > 0 && x.numel() > 0, "acon_c launch plan: x must be a non-empty tensor");
  const int64_t cdim = at::maybe_wrap_dim(channel_dim, x.dim());
  const at::Tensor p = at::empty({x.size(cdim)}, x.options());
  check_acon_c_args(x, p, p, beta, cdim);
  const EmulatedRunner runner = emulated_runner(multiprocessors, blocks_per_multiprocessor);
  const WorkTensors w = make_work_tensors(at::empty_like(x), x, beta, cdim);
  const ChannelLayout& l = w.layout;
  const int vector = pack_width(static_cast<int>(x.element_size()), backward);
  const int64_t bytes = vector * x.element_size();
  const bool aligned = is_aligned(w.x.const_data_ptr(), bytes) && is_aligned(w.out.const_data_ptr(), bytes);
  const KernelChoice k = choose_kernel(l, vector, aligned);
  // The plan of a call that wants every gradient: the backward adds sums.
  const MainPlan p_main = plan_main(l, k, runner.multiprocessors * runner.blocks_per_multiprocessor, backward);

  int64_t most = 0; // block 0 takes the most items
  for (int64_t t = 0; t < p_main.teams_per_block; ++t) {
    most += t < p_main.items ? ceil_div(p_main.items - t, p_main.grid * p_main.teams_per_block) : 0;
  }
  int64_t busy;
  if (k.runs) {
    busy = busy_permille(p_main, l.outer * p_main.row_vectors, p_main.team, 1.0);
  } else {
    const int64_t channel_vectors = l.channels / k.width;
    busy = busy_permille(
        p_main,
        l.outer,
        kThreads / p_main.tile_vectors,
        static_cast<double>(channel_vectors) / (p_main.tiles * p_main.tile_vectors));
  }
  std::vector<int64_t> plan = {
      k.runs ? 0 : 1, p_main.grid, kThreads, p_main.items, p_main.teams_per_block, most, busy, p_main.grid * kThreads};
  if (backward) {
    const ReducePlan r = plan_reduce(l, p_main.chunks, beta.numel());
    const int64_t units = r.g.end_unit;
    // Independent chains of adds: an (A, B) lane has two.
    const int64_t lanes = 2 * l.channels * r.ab.lanes_y + (units - l.channels) * r.g.lanes_y;
    const int64_t most = std::max(r.ab.units_x, r.g.units_x);
    // The longest lane: the most partial sums one lane adds.
    const int64_t longest = std::max(
        ceil_div(l.groups * p_main.chunks, r.ab.lanes_y), beta.numel() > 0 ? ceil_div(p_main.chunks, r.g.lanes_y) : 0);
    const std::vector<int64_t> reduce = {2, r.grid, kThreads, units, most, most, longest, lanes};
    plan.insert(plan.end(), reduce.begin(), reduce.end());
  }
  return plan;
}

} // namespace
} // namespace acon_cuda::cuda

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("_acon_c_forward_cuda_emulated", &acon_cuda::cuda::acon_c_forward_emulated);
  m.impl("_acon_c_backward_cuda_emulated", &acon_cuda::cuda::acon_c_backward_emulated);
  m.impl("_acon_c_cuda_launch_plan", &acon_cuda::cuda::acon_c_launch_plan);
}
