// CUDA implementations of the acon ops; the twin of csrc/cpu/acon_c_cpu.cpp.
// The kernels here are the per-thread code of acon_c_kernel.cuh plus what
// only a GPU has: warp shuffles, shared memory and barriers. The plan and
// the host flow are in acon_c_launch.h, shared with the emulation.
#include "acon_c_launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

namespace acon_cuda::cuda {
namespace {

// Resident blocks per multiprocessor the main kernels are compiled for: at
// most 80 registers a thread (65536 / (3 * 256), in allocation steps). The
// float64 runs backward would spill at 80; float64 is not a training dtype.
template <typename scalar_t>
constexpr int kMinBlocks = sizeof(scalar_t) == 8 ? 2 : 3;

// Adds each of v[0..2] over a team of `team` lanes (a power of two <= 32,
// aligned in its warp): lane 0 of the team gets the sums, in the order of
// tree_sum (acon_c_emulation.cpp). Every lane of the warp must call it.
__device__ __forceinline__ void team_sum3(double (&v)[3], int team) {
  for (int offset = team / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      v[s] += __shfl_down_sync(0xffffffffu, v[s], offset, team);
    }
  }
}

// Runs (inner > 1); see runs_lane. Team t of the grid takes items t, t +
// teams in the grid, ... The teams of a warp take their turns together (an
// item past the end computes nothing but joins the shuffles), so no lane
// leaves a warp's shuffle early. No barriers, no shared memory.
template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>) acon_c_runs_kernel(const KernelArgs<scalar_t> args) {
  const int team = args.team;
  const int lane = threadIdx.x % team;
  const int team_in_block = threadIdx.x / team;
  const int warp_first_team = (threadIdx.x / kWarpSize) * (kWarpSize / team);
  const int64_t teams_per_block = kThreads / team;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * teams_per_block;
  for (int64_t first = blockIdx.x * teams_per_block + warp_first_team; first < args.items; first += stride) {
    const int64_t item = first + (team_in_block - warp_first_team);
    const Item it = locate(item, args.chunks, args.channels);
    double sums[3] = {0.0, 0.0, 0.0};
    if (item < args.items) {
      runs_lane<scalar_t, kWidth, kBackward, kRagged>(args, it, lane, sums);
    }
    if (kBackward && args.partials != nullptr) {
      team_sum3(sums, team);
      if (lane == 0 && item < args.items) {
        for (int s = 0; s < 3; ++s) {
          *args.partial(s, it.g, it.chunk, it.minor) = sums[s];
        }
      }
    }
  }
}

// Channels innermost (inner == 1); see columns_thread. The backward moves
// each thread's three opmath sums to shared memory in one pass and adds
// each channel's column with columns_block_sum: two barriers per item.
template <typename scalar_t, int kWidth, bool kBackward>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>)
    acon_c_columns_kernel(const KernelArgs<scalar_t> args) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t column_sums[kBackward ? 3 * kWidth * kThreads : 1];
  const int outputs = 3 * kWidth * args.tile_vectors;
  for (int64_t item = blockIdx.x; item < args.items; item += gridDim.x) {
    const Item it = locate(item, args.chunks, args.tiles);
    opmath_t a[kWidth], b[kWidth], gs[kWidth];
    columns_thread<scalar_t, kWidth, kBackward>(args, it, threadIdx.x, a, b, gs);
    if (kBackward && args.partials != nullptr) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        column_sums[j * kThreads + threadIdx.x] = a[j];
        column_sums[(kWidth + j) * kThreads + threadIdx.x] = b[j];
        column_sums[(2 * kWidth + j) * kThreads + threadIdx.x] = gs[j];
      }
      __syncthreads();
      for (int o = threadIdx.x; o < outputs; o += kThreads) {
        columns_block_sum<scalar_t, kWidth>(args, it, column_sums, o);
      }
      __syncthreads(); // column_sums is reused by the block's next item
    }
  }
}

// Block: units_x units by lanes_y lanes of its region (reduce_lane), then
// a fixed shared-memory tree over the lanes.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reduce_channel_sums(const ReduceArgs<scalar_t> args) {
  __shared__ double lanes[2][kThreads];
  const ReduceRegion& region = args.region(blockIdx.x);
  const int units_x = region.units_x;
  const int y = threadIdx.x / units_x;
  const int64_t u = region.unit(blockIdx.x, threadIdx.x % units_x);
  double sums[2];
  reduce_lane(args, region.lanes_y, u, y, sums);
  lanes[0][threadIdx.x] = sums[0];
  lanes[1][threadIdx.x] = sums[1];
  __syncthreads();
  for (int half = region.lanes_y / 2; half > 0; half /= 2) {
    if (y < half) {
      lanes[0][threadIdx.x] += lanes[0][threadIdx.x + half * units_x];
      lanes[1][threadIdx.x] += lanes[1][threadIdx.x + half * units_x];
    }
    __syncthreads();
  }
  if (y == 0) {
    const double total[2] = {lanes[0][threadIdx.x], lanes[1][threadIdx.x]};
    write_unit(args, u, total);
  }
}

template <typename scalar_t, typename Kind, bool kBackward>
constexpr auto main_kernel() {
  if constexpr (Kind::runs) {
    return acon_c_runs_kernel<scalar_t, Kind::width, kBackward, Kind::ragged>;
  } else {
    return acon_c_columns_kernel<scalar_t, Kind::width, kBackward>;
  }
}

// What the launches ask of a GPU: its multiprocessor count, and how many
// blocks of a kernel fit on one multiprocessor. Both are fixed for a (kernel,
// device), so they are asked once, not on every call (and so not inside a
// CUDA graph capture that a warm-up call preceded).
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

// Launches on the current stream of x's GPU (the op's CUDAGuard made it the
// current device).
struct GpuRunner {
  int device;
  cudaStream_t stream;

  template <typename scalar_t, typename Kind, bool kBackward>
  int64_t resident_blocks() const {
    const void* kernel = reinterpret_cast<const void*>(main_kernel<scalar_t, Kind, kBackward>());
    return static_cast<int64_t>(DeviceQueries::blocks_per_multiprocessor(kernel, device)) *
        DeviceQueries::multiprocessors(device);
  }

  template <typename scalar_t, typename Kind, bool kBackward>
  void main(const KernelArgs<scalar_t>& args, int64_t grid) const {
    main_kernel<scalar_t, Kind, kBackward>()<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  void reduce(const ReduceArgs<scalar_t>& args, int64_t grid) const {
    reduce_channel_sums<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

GpuRunner gpu_runner(const at::Tensor& x) {
  return {x.get_device(), c10::cuda::getCurrentCUDAStream(x.get_device()).stream()};
}

at::Tensor acon_c_forward_cuda(
    const at::Tensor& x,
    const at::Tensor& p1,
    const at::Tensor& p2,
    const at::Tensor& beta,
    int64_t channel_dim) {
  const int64_t cdim = check_acon_c_args(x, p1, p2, beta, channel_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  GpuRunner runner = gpu_runner(x);
  return acon_c_forward_on(runner, x, p1, p2, beta, cdim);
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
  GpuRunner runner = gpu_runner(x);
  return acon_c_backward_on(runner, grad_y, x, p1, p2, beta, cdim, output_mask);
}

} // namespace
} // namespace acon_cuda::cuda

TORCH_LIBRARY_IMPL(acon, CUDA, m) {
  m.impl("acon_c_forward", &acon_cuda::cuda::acon_c_forward_cuda);
  m.impl("acon_c_backward", &acon_cuda::cuda::acon_c_backward_cuda);
}
