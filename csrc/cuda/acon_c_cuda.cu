// CUDA implementations of the acon ops; the twin of csrc/cpu/acon_c_cpu.cpp.
// Each kernel is its block-level steps (acon_c_kernel.cuh) run on the
// GpuBlock (acon_c_block.h), with its __shared__ arrays. The plan and the
// host flow are in acon_c_launch.h, shared with the emulation.
#include "acon_c_block.h"
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

template <typename scalar_t, int kWidth, bool kBackward, bool kRagged>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>) acon_c_runs_kernel(const KernelArgs<scalar_t> args) {
  runs_block<scalar_t, kWidth, kBackward, kRagged>(GpuBlock{}, args);
}

template <typename scalar_t, int kWidth, bool kBackward>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>)
    acon_c_columns_kernel(const KernelArgs<scalar_t> args) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t staged[kBackward ? 3 * kWidth * kThreads : 1];
  GpuShared<opmath_t> shared{staged};
  columns_block<scalar_t, kWidth, kBackward>(GpuBlock{}, args, shared);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reduce_channel_sums(const ReduceArgs<scalar_t> args) {
  __shared__ double lanes[2 * kThreads];
  GpuShared<double> shared{lanes};
  reduce_block(GpuBlock{}, args, shared);
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
