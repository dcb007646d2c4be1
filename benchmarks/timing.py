"""How the benchmarks time things, shared by the main benchmark and the probes:
medians of blocks of calls (CPU) or of CUDA-event batches, wall-clock time of
one call, the bytes autograd keeps for backward, and glibc's malloc kept from
returning freed memory.
"""

import ctypes
import itertools
import math
import platform
import statistics
import time

import torch
from torch.utils import benchmark

# The caches a rotation of inputs must overflow (bytes): last-level cache
# of a server CPU, and the L2 of a large GPU.
CACHE_BYTES = {"cpu": 64 << 20, "cuda": 64 << 20}


def input_copies(device, x_bytes):
    """Enough copies of the inputs that the caches overflow between two uses
    of one (a tensor larger than the caches needs no second copy)."""
    return max(1, min(32, math.ceil(CACHE_BYTES[device] / x_bytes)))


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory instead of returning it to the
    system. By default, large blocks go back to the kernel on free and are
    faulted in again page by page on the next allocation, which then costs
    more than the kernels themselves, by an amount that depends on the order
    of earlier allocations. That is noise, and it hits the composite reference
    (many temporaries) hardest, so this setting is the conservative one for
    the fused op's speedups. Same effect as running under jemalloc/tcmalloc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def rotation(make_call, copies):
    """One call that runs make_call(i)'s call for i = 0, 1, ..., copies - 1,
    0, ... in turn: each input copy in rotation."""
    calls = itertools.cycle([make_call(i) for i in range(copies)])
    return lambda: next(calls)()


def warm_up(calls, device, copies):
    """Runs each call once per input copy (nothing lazy is timed); returns
    each call's last wall-clock ms, a first estimate for the timing."""
    estimate = {}
    for key, call in calls.items():
        for _ in range(copies):
            estimate[key] = wall_ms(call, device)
    return estimate


def saved_bytes(fn, inputs, exclude=()):
    """Bytes autograd keeps for backward (distinct storages, as packed),
    leaving out the storages of the tensors in `exclude` (such as a model's
    parameters, which exist whether or not a backward keeps them)."""
    seen = {}
    excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def median_ms(fn, device, budget_s, once_ms):
    """Median time of one call of fn, in ms; once_ms is a first estimate."""
    if device == "cpu":
        # Every thread of the pool: Timer's default is one (single-thread
        # figures), which the report's thread count would misstate.
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        if once_ms > 1e3 * budget_s:  # slow: one call is the measurement
            return timer.timeit(1).median * 1e3
        # Five blocks filling the budget; the median block's time per call.
        number = max(1, int(budget_s * 1e3 / 5 / max(once_ms, 1e-3)))
        return statistics.median(timer.timeit(number).median for _ in range(5)) * 1e3
    # CUDA: events around batches of calls on the current stream.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    number = max(1, min(1000, int(budget_s * 1e3 / 10 / max(once_ms, 1e-3))))
    samples = []
    for _ in range(10):
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / number)
    return statistics.median(samples)


def interleaved_medians(calls, device, budget_s, estimates, blocks=15):
    """Median ms per call of each of `calls` (key -> call), timed in blocks
    taken in turn (A, B, C, A, B, C, ...): drift of the machine's speed over
    the run (other tenants, clock changes) then hits every contender alike,
    where consecutive blocks of one contender would each see another state.
    A block lasts about budget_s / blocks; estimates: key -> a first ms."""
    number = {key: max(1, int(budget_s * 1e3 / blocks / max(estimates[key], 1e-3))) for key in calls}
    samples = {key: [] for key in calls}
    for _ in range(blocks):
        for key, call in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(number[key]):
                call()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[key].append((time.perf_counter() - start) * 1e3 / number[key])
    return {key: statistics.median(values) for key, values in samples.items()}


def wall_ms(call, device):
    """Wall-clock time of one call, in ms, the GPU's work included."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3
