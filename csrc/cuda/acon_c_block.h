// The two Blocks the kernels' block-level steps (acon_c_kernel.cuh) run on:
// - GpuBlock (CUDA compilation): the block of threads the kernel runs on;
// - SimBlock (host compilation, the emulation): the block's kThreads
//   threads in lockstep, run one after the other up to each barrier, team
//   sums as __shfl_down_sync computes them, and shared memory whose every
//   access between two barriers is checked (SimShared).
#pragma once

#include "acon_c_kernel.cuh"

#ifdef __CUDACC__

namespace acon_cuda::cuda {

// A thread's own value: a register.
template <typename T>
struct GpuLocal {
  T value;
  ACON_HD T& operator[](int) {
    return value;
  }
};

struct GpuBlock {
  template <typename T>
  using Local = GpuLocal<T>;

  // GpuBlock's functions run on the device only: the __host__ halves are
  // never called (the kernels are __global__).
  ACON_HD int64_t index() const {
#ifdef __CUDA_ARCH__
    return blockIdx.x;
#else
    return 0;
#endif
  }
  ACON_HD int64_t count() const {
#ifdef __CUDA_ARCH__
    return gridDim.x;
#else
    return 0;
#endif
  }
  template <typename F>
  ACON_HD void threads(F&& f) const {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x));
#endif
  }
  ACON_HD void barrier(BarrierSite) const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  // Every lane of the warp calls it (team sums are block-uniform steps);
  // the teams are `team` lanes, aligned in the warp.
  template <int N>
  ACON_HD void team_sum(Local<DoubleSums<N>>& sums, int team) const {
#ifdef __CUDA_ARCH__
    for (int offset = team / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int s = 0; s < N; ++s) {
        sums.value.v[s] += __shfl_down_sync(0xffffffffu, sums.value.v[s], offset, team);
      }
    }
#endif
  }
};

// A __shared__ array the kernel declared.
template <typename T>
struct GpuShared {
  T* words;
  ACON_HD T load(int, int i) const {
    return words[i];
  }
  ACON_HD void store(int, int i, T v) const {
    words[i] = v;
  }
};

} // namespace acon_cuda::cuda

#else // the emulation

#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace acon_cuda::cuda {

// Changes the emulated hardware makes to a kernel, for the tests that show
// the checks catch them: a barrier that does nothing, a team sum over
// another shuffle width.
struct Mutation {
  int dropped_barrier = 0; // a BarrierSite, 0: none
  int shuffle_width = 0;   // 0: the kernel's own
};

// The thread whose step SimBlock::threads is running (-1: none, as in a
// team sum): on the GPU a Local is the thread's own register whatever the
// index, so a step that reads another thread's value is an error here.
inline int& sim_running_thread() {
  static thread_local int t = -1;
  return t;
}

template <typename T>
struct SimLocal {
  std::vector<T> values = std::vector<T>(kThreads);
  T& operator[](int t) {
    const int running = sim_running_thread();
    TORCH_CHECK(running < 0 || running == t, "emulated Local: thread ", running, " reads thread ", t, "'s value");
    return values[t];
  }
};

class SimBlock {
 public:
  template <typename T>
  using Local = SimLocal<T>;

  SimBlock(int64_t index, int64_t count, const Mutation& mutation)
      : index_(index), count_(count), mutation_(mutation) {}

  int64_t index() const {
    return index_;
  }
  int64_t count() const {
    return count_;
  }
  // Every thread runs the step before any runs the next: the lockstep a
  // barrier would give, without assuming one; shared memory accesses are
  // checked against the barriers actually passed (epoch).
  template <typename F>
  void threads(F&& f) const {
    struct NoneRunning { // also when a step raises
      ~NoneRunning() {
        sim_running_thread() = -1;
      }
    } none_after;
    for (int t = 0; t < kThreads; ++t) {
      sim_running_thread() = t;
      f(t);
    }
  }
  void barrier(BarrierSite site) const {
    if (static_cast<int>(site) != mutation_.dropped_barrier) {
      ++epoch_;
    }
  }
  uint64_t epoch() const {
    return epoch_;
  }
  // __shfl_down_sync(0xffffffff, v, offset, width) in each warp: lane l
  // reads lane l + offset if that lane is in l's segment of `width` lanes,
  // else its own value; all lanes of the warp take part.
  template <int N>
  void team_sum(Local<DoubleSums<N>>& sums, int team) const {
    const int width = mutation_.shuffle_width > 0 ? mutation_.shuffle_width : team;
    TORCH_CHECK(
        width >= 1 && width <= kWarpSize && (width & (width - 1)) == 0,
        "emulated shuffle: width ",
        width,
        " is not a power of two <= 32");
    std::vector<DoubleSums<N>> read(kThreads);
    for (int offset = team / 2; offset > 0; offset /= 2) {
      for (int t = 0; t < kThreads; ++t) {
        const int lane = t % kWarpSize;
        const bool inside = lane % width + offset < width;
        read[t] = sums[inside ? t + offset : t];
      }
      for (int t = 0; t < kThreads; ++t) {
        for (int s = 0; s < N; ++s) {
          sums[t].v[s] += read[t].v[s];
        }
      }
    }
  }

 private:
  int64_t index_, count_;
  Mutation mutation_;
  mutable uint64_t epoch_ = 1;
};

// Shared memory of one block, uninitialised as on the GPU: a read of a word
// no thread wrote, or two threads touching a word between the same two
// barriers with one of them writing, raise an error naming the word.
template <typename T>
class SimShared {
 public:
  SimShared(const SimBlock& block, int words) : block_(block), words_(words) {}

  T load(int t, int i) const {
    Word& w = word(i);
    TORCH_CHECK(w.written, "emulated shared memory: thread ", t, " reads word ", i, ", which no thread wrote");
    TORCH_CHECK(
        w.writer < 0 || w.writer == t,
        "emulated shared memory: thread ",
        t,
        " reads word ",
        i,
        " that thread ",
        w.writer,
        " wrote with no barrier between");
    w.reader = w.reader < 0 || w.reader == t ? t : kSeveral;
    return w.value;
  }
  void store(int t, int i, T v) const {
    Word& w = word(i);
    TORCH_CHECK(
        (w.writer < 0 || w.writer == t) && (w.reader < 0 || w.reader == t),
        "emulated shared memory: thread ",
        t,
        " writes word ",
        i,
        " that another thread read or wrote with no barrier between");
    w.writer = t;
    w.written = true;
    w.value = v;
  }

 private:
  static constexpr int kSeveral = kThreads;
  struct Word {
    T value{};
    bool written = false;
    uint64_t epoch = 0;
    int writer = -1, reader = -1; // this epoch's
  };
  Word& word(int i) const {
    TORCH_CHECK(0 <= i && i < static_cast<int>(words_.size()), "emulated shared memory: word ", i, " out of bounds");
    Word& w = words_[i];
    if (w.epoch != block_.epoch()) {
      w.epoch = block_.epoch();
      w.writer = w.reader = -1;
    }
    return w;
  }
  const SimBlock& block_;
  mutable std::vector<Word> words_;
};

} // namespace acon_cuda::cuda

#endif
