// Test hooks' kernels, in CUDA builds only (tests/test_cuda_emulation.py;
// the schemas, in every build, are in csrc/acon.cpp):
// - the CUDA ops run on CPU tensors: each kernel's block-level steps
//   (acon_c_kernel.cuh) on a SimBlock (acon_c_block.h), block after block,
//   with the host flow of the GPU (acon_c_launch.h), as on a GPU of a given
//   size. Threads run in lockstep between barriers, team sums are computed
//   as __shfl_down_sync does, shared-memory accesses between two barriers
//   are checked, and the kernels are built with -fmad=false, so the sums are
//   formed and added as on the GPU. Results can still differ from the GPU's
//   in the last bits: CUDA's exp/expf and the host's may round differently,
//   and 16-bit math uses fast_exp's and fast_reciprocal's models. Blocks run
//   one after the other (blocks share nothing but their outputs), and the
//   GPU's timing is not covered;
// - the emulation's mutations (a barrier dropped, another shuffle width),
//   for the tests that show its checks catch them;
// - the launch plan for a shape on a GPU of a given size.
#include "acon_c_block.h"
#include "acon_c_launch.h"

#include <torch/library.h>

#include <vector>

namespace acon_cuda::cuda {
namespace {

// Set by the mutation hook; the tests reset it.
Mutation& emulated_mutation() {
  static Mutation mutation;
  return mutation;
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
    using opmath_t = at::opmath_type<scalar_t>;
    for (int64_t b = 0; b < grid; ++b) {
      const SimBlock block(b, grid, emulated_mutation());
      if constexpr (Kind::runs) {
        runs_block<scalar_t, Kind::width, kBackward, Kind::ragged>(block, args);
      } else {
        SimShared<opmath_t> staged(block, kBackward ? 3 * Kind::width * kThreads : 1);
        columns_block<scalar_t, Kind::width, kBackward>(block, args, staged);
      }
    }
  }

  template <typename scalar_t>
  void reduce(const ReduceArgs<scalar_t>& args, int64_t grid) const {
    for (int64_t b = 0; b < grid; ++b) {
      const SimBlock block(b, grid, emulated_mutation());
      SimShared<double> lanes(block, 2 * kThreads);
      reduce_block(block, args, lanes);
    }
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

// The kernels one call launches, 8 numbers each: kind (0 runs, 1 columns,
// 2 reduce), grid, threads per block, items (reduce: units), teams per block
// (reduce: units per block), the most items a block takes, busy lane slots
// per mille (reduce: the most partial sums one lane adds), and independent
// lanes (grid * threads; reduce: independent chains of adds). A backward's
// list ends with the bytes of its workspace. The plan is that of a call
// that wants every gradient.
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
  const MainPlan p_main = plan_main(
      l,
      k,
      runner.multiprocessors * runner.blocks_per_multiprocessor,
      backward,
      x.element_size(),
      moved_streams(backward, true));

  int64_t most = 0; // block 0 takes the most items
  for (int64_t t = 0; t < p_main.teams_per_block; ++t) {
    most += t < p_main.items ? ceil_div(p_main.items - t, p_main.grid * p_main.teams_per_block) : 0;
  }
  const auto busy = static_cast<int64_t>(1000.0 * busy_share(p_main, l, k));
  std::vector<int64_t> plan = {
      k.runs ? 0 : 1, p_main.grid, kThreads, p_main.items, p_main.teams_per_block, most, busy, p_main.grid * kThreads};
  if (backward) {
    const ReducePlan r = plan_reduce(l, p_main, beta.numel());
    const int64_t units = r.g.end_unit;
    // Independent chains of adds: an (A, B) lane has two.
    const int64_t lanes = 2 * l.channels * r.ab.lanes_y + (units - l.channels) * r.g.lanes_y;
    const int64_t most = std::max(r.ab.units_x, r.g.units_x);
    // The longest lane: the most partial sums one lane adds.
    const int64_t longest =
        std::max(ceil_div(p_main.slots, r.ab.lanes_y), units > l.channels ? ceil_div(p_main.chunks, r.g.lanes_y) : 0);
    const std::vector<int64_t> reduce = {2, r.grid, kThreads, units, most, most, longest, lanes};
    plan.insert(plan.end(), reduce.begin(), reduce.end());
    plan.push_back(p_main.workspace_doubles * static_cast<int64_t>(sizeof(double)));
  }
  return plan;
}

void acon_c_emulation_mutate(int64_t dropped_barrier, int64_t shuffle_width) {
  emulated_mutation() = Mutation{static_cast<int>(dropped_barrier), static_cast<int>(shuffle_width)};
}

} // namespace
} // namespace acon_cuda::cuda

TORCH_LIBRARY_IMPL(acon, CPU, m) {
  m.impl("_acon_c_forward_cuda_emulated", &acon_cuda::cuda::acon_c_forward_emulated);
  m.impl("_acon_c_backward_cuda_emulated", &acon_cuda::cuda::acon_c_backward_emulated);
  m.impl("_acon_c_cuda_launch_plan", &acon_cuda::cuda::acon_c_launch_plan);
}

TORCH_LIBRARY_IMPL(acon, CompositeExplicitAutograd, m) {
  m.impl("_acon_c_cuda_emulation_mutate", &acon_cuda::cuda::acon_c_emulation_mutate);
}
