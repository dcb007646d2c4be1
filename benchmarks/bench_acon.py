"""Fused ACON-C against what people use instead: the paper's public code, the
plain-PyTorch reference (d*x formed once), torch.compile of the reference,
F.silu (one transcendental per element: the floor for this kind of op) and a
copy of x (the memory floor). Forward, backward (from the forward's saved
state) and forward+backward, each timed on its own.

Every figure is measured in this run: medians of interleaved rounds, after
warm-up, with inputs rotated so that no contender runs from a warm cache.
"""

import argparse
import ctypes
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import acon_cuda
from acon_cuda import reference

MODES = ["forward", "backward", "fwd+bwd"]
# x-sized tensors each mode must move at least (read x, write y; read x and
# dy, write dx), and beta-sized ones (read beta; read beta, write its
# gradient), which count where beta is per sample: the bytes behind the
# GB/s figures.
TRAFFIC = {"forward": 2, "backward": 3, "fwd+bwd": 5}
BETA_TRAFFIC = {"forward": 1, "backward": 2, "fwd+bwd": 3}

# name -> (shape, channel_dim, per-sample beta); None is the batch (--batch:
# 32 on CUDA; 16 on the CPU, where 2 cores would take over 4 minutes at 32).
# ResNet-50's stage outputs, a tensor small enough that launch overhead
# dominates, (N, C) and (B, T, C) features, Meta-ACON's per-sample beta, and
# (GPU only) one above 256 MB in float32 and bfloat16.
SIZES = {
    "stage1": ((None, 256, 56, 56), 1, False),
    "stage2": ((None, 512, 28, 28), 1, False),
    "stage3": ((None, 1024, 14, 14), 1, False),
    "stage4": ((None, 2048, 7, 7), 1, False),
    "small": ((4, 64, 8, 8), 1, False),
    "features": ((256, 4096), 1, False),
    # Meta-ACON on features, (N, C) beta: not a default case; compare it
    # with "features" (--sizes features,meta-feat).
    "meta-feat": ((256, 4096), 1, True),
    "tokens": ((32, 197, 768), -1, False),
    "meta-acon": ((None, 256, 28, 28), 1, True),
    "large": ((64, 256, 112, 112), 1, False),
}
DEFAULT_BATCH = {"cpu": 16, "cuda": 32}
DEFAULT_SIZES = {
    "cpu": ["stage1", "stage2", "stage3", "stage4", "small", "features", "tokens", "meta-acon"],
    "cuda": ["large", "stage1", "stage2", "stage3", "stage4", "small", "features", "tokens", "meta-acon"],
}
QUICK_SIZES = ["small", "tokens"]
# The caches a rotation of inputs must overflow (bytes): last-level cache
# of a server CPU, and the L2 of a large GPU.
CACHE_BYTES = {"cpu": 64 << 20, "cuda": 64 << 20}


def paper_acon_c(x, p1, p2, beta, channel_dim):
    """ACON-C as the paper's public code writes it (AconC.forward), in x's
    dtype: (p1*x - p2*x) * sigmoid(beta * (p1*x - p2*x)) + p2*x."""
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    beta_shape = list(shape)
    if beta.numel() != x.shape[channel_dim]:
        beta_shape[0] = x.shape[0]
    p1, p2, beta = (t.reshape(s).to(x.dtype) for t, s in ((p1, shape), (p2, shape), (beta, beta_shape)))
    dpx = p1 * x - p2 * x
    return dpx * torch.sigmoid(beta * dpx) + p2 * x


def silu(x, p1, p2, beta, channel_dim):
    return F.silu(x)


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


def saved_bytes(fn, inputs):
    """Bytes autograd keeps for backward (distinct storages, as packed)."""
    seen = {}

    def pack(t):
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


def wall_ms(call, device):
    """Wall-clock time of one call, in ms, the GPU's work included."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def make_inputs(shape, channel_dim, layout, per_sample, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[channel_dim]
    p1 = torch.randn(channels, device=device)
    p2 = torch.randn(channels, device=device)
    beta = torch.rand(shape[0], channels, device=device) + 0.5 if per_sample else torch.ones(channels, device=device)
    return x, p1, p2, beta


def measure_case(name, layout, dtype, device, rounds, budget_s, batch):
    shape, channel_dim, per_sample = SIZES[name]
    shape = tuple(batch if n is None else n for n in shape)
    x_bytes = math.prod(shape) * dtype.itemsize
    # Enough copies of the inputs that the caches overflow between two uses
    # of one (a tensor larger than the caches needs no second copy).
    copies = max(1, min(32, math.ceil(CACHE_BYTES[device] / x_bytes)))
    sets = [make_inputs(shape, channel_dim, layout, per_sample, dtype, device) for _ in range(copies)]
    grads = [torch.randn_like(s[0]) for s in sets]
    leaves = [[t.clone().requires_grad_() for t in s] for s in sets]

    torch._dynamo.reset()  # each case compiles afresh, within the recompile limit
    compiled = torch.compile(reference.acon_c)
    contenders = {
        "fused": acon_cuda.acon_c,
        "paper": paper_acon_c,
        "reference": reference.acon_c,
        "compiled": compiled,
        "silu": silu,
    }
    # Compile (inference graph, forward and backward graphs) before timing.
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*sets[0], channel_dim)
    torch.autograd.grad(compiled(*leaves[0], channel_dim), leaves[0], grads[0])
    if device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start

    def rotation(make_call):
        calls = itertools.cycle([make_call(i) for i in range(copies)])
        return lambda: next(calls)()

    def calls_for(fn):
        # SiLU has no parameters: its backward reaches x only.
        def wrt(i):
            return leaves[i][:1] if fn is silu else leaves[i]

        outputs = [fn(*leaves[i], channel_dim) for i in range(copies)]

        def forward(i):
            def call():
                with torch.no_grad():
                    fn(*sets[i], channel_dim)

            return call

        def backward(i):
            return lambda: torch.autograd.grad(outputs[i], wrt(i), grads[i], retain_graph=True)

        def both(i):
            return lambda: torch.autograd.grad(fn(*leaves[i], channel_dim), wrt(i), grads[i])

        return {"forward": rotation(forward), "backward": rotation(backward), "fwd+bwd": rotation(both)}

    calls = {key: calls_for(fn) for key, fn in contenders.items()}
    buffers = [torch.empty_like(s[0]) for s in sets]
    calls["copy"] = {"forward": rotation(lambda i: lambda: buffers[i].copy_(sets[i][0]))}

    # Warm-up, one call per input copy (nothing lazy is timed), which also
    # gives each call's first time estimate.
    estimate = {}
    for key, per_mode in calls.items():
        for mode, call in per_mode.items():
            for _ in range(copies):
                estimate[(key, mode)] = wall_ms(call, device)
    times = {(key, mode): [] for key, per_mode in calls.items() for mode in per_mode}
    for _ in range(rounds):
        for key, mode in times:
            times[(key, mode)].append(median_ms(calls[key][mode], device, budget_s, estimate[(key, mode)]))
    ms = {}
    for (key, mode), samples in times.items():
        ms.setdefault(key, {})[mode] = statistics.median(samples)

    beta_bytes = sets[0][3].nbytes
    moved = {mode: TRAFFIC[mode] * x_bytes + BETA_TRAFFIC[mode] * beta_bytes for mode in MODES}
    result = {
        "case": name,
        "shape": list(shape),
        "channel_dim": channel_dim,
        "layout": layout,
        "per_sample_beta": per_sample,
        "dtype": str(dtype).replace("torch.", ""),
        "x_bytes": x_bytes,
        "beta_bytes": beta_bytes,
        "input_copies": copies,
        "compile_s": compile_s,
        "ms": ms,
        "gbps": {
            key: {mode: moved[mode] / (t * 1e6) for mode, t in per_mode.items()}
            for key, per_mode in ms.items()
            if key != "copy"
        },
        "copy_gbps": TRAFFIC["forward"] * x_bytes / (ms["copy"]["forward"] * 1e6),
        "saved_bytes": {key: saved_bytes(fn, (*leaves[0], channel_dim)) for key, fn in contenders.items()},
    }
    if device == "cuda":
        result["peak_bytes"] = {
            key: cuda_peak_bytes(fn, leaves[0], grads[0], channel_dim) for key, fn in contenders.items()
        }
    return result


def cuda_peak_bytes(fn, leaves, grad, channel_dim):
    """Peak CUDA memory of one forward+backward, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    wrt = leaves[:1] if fn is silu else leaves
    torch.autograd.grad(fn(*leaves, channel_dim), wrt, grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class PaperAconC(acon_cuda.AconC):
    """AconC computed as the paper's public code does (``paper_acon_c``)."""

    def forward(self, x):
        self._check_input(x)
        return paper_acon_c(x, self.p1, self.p2, self.beta, self.channel_dim)


class PaperMetaAconC(acon_cuda.MetaAconC):
    """MetaAconC computed as the paper's public code does: the generator's
    1x1 convolutions and BatchNorm2d on the (N, C, 1, 1) mean, and
    ``paper_acon_c``."""

    def forward(self, x):
        self._check_input(x)
        mean = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(mean)))))
        return paper_acon_c(x, self.p1, self.p2, beta, 1)


# Meta-ACON module cases (None: --batch): the Meta-ACON issue's sizes.
META_SHAPES = [(None, 256, 28, 28), (None, 2048, 7, 7), (4, 64, 8, 8)]
META_MODULES = {
    "silu": lambda width: torch.nn.SiLU(),
    "acon_c": lambda width: acon_cuda.AconC(width),
    "meta_acon_c": lambda width: acon_cuda.MetaAconC(width),
    "paper_meta_acon_c": lambda width: PaperMetaAconC(width),
}


def measure_meta_modules(device, batch, layouts, rounds, budget_s):
    """Modules in training mode, forward+backward (x and every parameter):
    MetaAconC against the fused AconC, the paper's MetaAconC and SiLU, with
    inputs rotated as in measure_case."""
    rows = []
    for shape in META_SHAPES:
        shape = tuple(batch if n is None else n for n in shape)
        x_bytes = math.prod(shape) * 4
        copies = max(1, min(32, math.ceil(CACHE_BYTES[device] / x_bytes)))
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xs = [
                torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_() for _ in range(copies)
            ]
            grads = [torch.randn_like(x) for x in xs]
            torch.manual_seed(0)
            modules = {key: make(shape[1]).to(device).train() for key, make in META_MODULES.items()}

            def call_for(module):
                wrt = list(module.parameters())

                def call(i):
                    return lambda: torch.autograd.grad(module(xs[i]), [xs[i], *wrt], grads[i])

                calls = itertools.cycle([call(i) for i in range(copies)])
                return lambda: next(calls)()

            calls = {key: call_for(module) for key, module in modules.items()}
            estimate = {}
            for key, call in calls.items():
                for _ in range(copies):
                    estimate[key] = wall_ms(call, device)
            times = {key: [] for key in calls}
            for _ in range(rounds):
                for key in calls:
                    times[key].append(median_ms(calls[key], device, budget_s, estimate[key]))
            rows.append(
                {
                    "shape": list(shape),
                    "layout": layout,
                    "ms": {key: statistics.median(samples) for key, samples in times.items()},
                    "saved_bytes": {key: saved_bytes(lambda m=m: m(xs[0]), ()) for key, m in modules.items()},
                    "x_bytes": x_bytes,
                }
            )
    return rows


def meta_table(rows):
    lines = [
        "\nMeta-ACON modules, training mode, forward+backward (x and every parameter), float32",
        f"{'shape':<16} {'layout':<13} {'MetaAconC ms':>12} {'/ AconC':>8} {'paper / it':>10} {'/ SiLU':>7} "
        f"{'saved/x':>7} {'paper saved/x':>13}",
    ]
    for row in rows:
        ms, saved = row["ms"], row["saved_bytes"]
        meta = ms["meta_acon_c"]
        lines.append(
            f"{'x'.join(map(str, row['shape'])):<16} {row['layout']:<13} {meta:12.3f} {meta / ms['acon_c']:7.2f}x "
            f"{ms['paper_meta_acon_c'] / meta:9.2f}x {meta / ms['silu']:6.2f}x "
            f"{saved['meta_acon_c'] / row['x_bytes']:7.2f} {saved['paper_meta_acon_c'] / row['x_bytes']:13.2f}"
        )
    lines.append(
        "/ AconC, / SiLU: MetaAconC's time over the fused AconC module's and nn.SiLU's (lower is better);\n"
        "paper / it: the paper's MetaAconC (1x1 convolutions, eager formula) over MetaAconC's time."
    )
    return "\n".join(lines)


def training_step(model, x, target):
    """One SGD step of model on (x, target) (ACON parameters without weight
    decay), as a call."""
    optimizer = torch.optim.SGD(acon_cuda.param_groups(model, 1e-4), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_training_steps(models, x, target, device, steps, rounds):
    """Median ms of an SGD step per model, timed in interleaved rounds of
    `steps` steps (the machine's drift hits every model alike), and the
    bytes autograd keeps for backward (CPU) or the peak memory (CUDA)."""
    calls = {key: training_step(model, x, target) for key, model in models.items()}
    for call in calls.values():
        for _ in range(2):
            call()
    samples = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            samples[key] += [wall_ms(call, device) for _ in range(steps)]
    rows = {}
    for key, model in models.items():
        rows[key] = {
            "ms": statistics.median(samples[key]),
            "saved_bytes": saved_bytes(lambda: F.cross_entropy(model(x), target), ()),
        }
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            calls[key]()
            torch.cuda.synchronize()
            rows[key]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    return rows


def measure_training_steps(device, steps, rounds=3):
    """Two training steps with every ReLU converted (one ACON per call site):
    - torchvision ResNet-18 (batch 16, 112x112): fused against the
      reference ACON, and the ReLU model for scale;
    - torchvision ShuffleNetV2 0.5x, the paper's headline model (batch 32,
      160x160, channels_last): ReLU, SiLU, the paper's eager AconC and
      MetaAconC, and the fused AconC and MetaAconC, as ratios to the SiLU
      model."""
    try:
        import torchvision
    except ImportError:
        return None
    plans = [
        (
            "resnet18",
            "torchvision resnet18, ReLU -> AconC",
            16,
            112,
            torch.contiguous_format,
            ("relu", "fused", "reference"),
            "fused",
        ),
        (
            "shufflenet_v2_x0_5",
            "torchvision shufflenet_v2_x0_5, ReLU -> AconC, channels_last",
            32,
            160,
            torch.channels_last,
            ("silu", "relu", "paper", "fused", "paper_meta", "meta"),
            "silu",
        ),
    ]
    news = {
        "fused": {"impl": "fused"},
        "reference": {"impl": "reference"},
        "paper": {"new": PaperAconC},
        "meta": {"new": "meta_acon_c"},
        "paper_meta": {"new": PaperMetaAconC},
    }
    results = []
    for arch, title, batch, image, memory_format, variants, baseline in plans:
        x = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=memory_format)
        target = torch.randint(0, 1000, (batch,), device=device)
        models = {}
        for variant in variants:
            torch.manual_seed(0)
            model = getattr(torchvision.models, arch)().to(device, memory_format=memory_format)
            if variant == "silu":
                model = acon_cuda.convert_activations(model, new=lambda: torch.nn.SiLU())
            elif variant != "relu":
                model = acon_cuda.convert_activations(model, example_input=x[:2], **news[variant])
            models[variant] = model
        rows = time_training_steps(models, x, target, device, steps, rounds)
        results.append(
            {
                "model": title,
                "batch": batch,
                "image": image,
                "steps": steps * rounds,
                "rows": rows,
                "baseline": baseline,
            }
        )
    return results


TRAINING_LABELS = {
    "fused": "AconC, fused op",
    "reference": "AconC, reference",
    "paper": "AconC, paper's code",
    "relu": "ReLU (no ACON)",
    "silu": "SiLU (no ACON)",
    "meta": "MetaAconC",
    "paper_meta": "MetaAconC, paper's code",
}


def training_table(trains, device):
    lines = []
    for train in trains:
        rows, baseline = train["rows"], train["baseline"]
        lines += [
            f"\nTraining step: {train['model']}, batch {train['batch']}, {train['image']}x{train['image']}, "
            f"SGD, median of {train['steps']} steps (interleaved rounds)",
            f"{'activation':<24} {'ms / step':>10} {'/ ' + baseline:>9} {'saved for backward MB':>22}"
            + (f" {'peak MB':>8}" if device == "cuda" else ""),
        ]
        for variant, row in rows.items():
            lines.append(
                f"{TRAINING_LABELS[variant]:<24} {row['ms']:10.1f} {row['ms'] / rows[baseline]['ms']:8.2f}x "
                f"{row['saved_bytes'] / 2**20:22.1f}"
                + (f" {row['peak_bytes'] / 2**20:8.1f}" if device == "cuda" else "")
            )
    return "\n".join(lines)


def progress(done, total, label, started):
    width = 30
    filled = int(width * done / total)
    elapsed = time.perf_counter() - started
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} {elapsed:5.0f} s  {label:<40.40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def table(results, device):
    """The stdout table: one row per case and mode."""
    lines = []
    mem = "peak MB" if device == "cuda" else "saved/x"
    head = (
        f"{'case':<10} {'shape':<16} {'layout':<13} {'dtype':<8} {'mode':<8} {'fused ms':>9} {'GB/s':>7} {'%copy':>6} "
        f"{'vs paper':>8} {'vs ref':>7} {'vs compile':>10} {'/ silu':>7} {mem:>8}"
    )
    lines += [head, "-" * len(head)]
    for r in results:
        ms = r["ms"]
        for mode in MODES:
            fused = ms["fused"][mode]
            gbps = r["gbps"]["fused"][mode]
            if device == "cuda":
                memory = f"{r['peak_bytes']['fused'] / 2**20:8.1f}" if mode == "fwd+bwd" else ""
            else:
                memory = f"{r['saved_bytes']['fused'] / r['x_bytes']:8.2f}" if mode == "fwd+bwd" else ""
            lines.append(
                f"{r['case']:<10} {'x'.join(map(str, r['shape'])):<16} {r['layout']:<13} {r['dtype']:<8} "
                f"{mode:<8} {fused:9.3f} {gbps:7.1f} "
                f"{100 * gbps / r['copy_gbps']:5.0f}% {ms['paper'][mode] / fused:7.2f}x "
                f"{ms['reference'][mode] / fused:6.2f}x {ms['compiled'][mode] / fused:9.2f}x "
                f"{fused / ms['silu'][mode]:6.2f}x {memory:>8}"
            )
    lines.append(
        "\nGB/s: bytes that must move (forward: x read, y written; backward: x and dy read, dx written;\n"
        "and beta read, and its gradient written in backward) per second; %copy: that over the GB/s of\n"
        "copying x in the same run.\n"
        "vs paper / vs ref / vs compile: speedup of the fused op over the paper's code, the reference\n"
        "(d*x once) and torch.compile(reference); higher is better. / silu: fused time over F.silu's\n"
        "(lower is better; SiLU is the floor). "
        + (
            "peak MB: CUDA memory allocated by one forward+backward."
            if device == "cuda"
            else "saved/x: bytes kept for backward over x's bytes."
        )
    )
    return "\n".join(lines)


def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
        info["cpu_cores"] = len(names)
    except OSError:
        pass
    info["threads"] = torch.get_num_threads()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_multiprocessors"] = props.multi_processor_count
    else:
        info["cpu_kernels"] = acon_cuda.cpu_kernel_isa()
    return info


DTYPE_COLORS = (("float32", "tab:blue"), ("bfloat16", "tab:orange"), ("float16", "tab:green"), ("float64", "tab:red"))


def plot(results, path):
    """speedup.png: speedup over the reference and torch.compile against size
    (forward, backward), and fused fwd+bwd time over F.silu's (floor 1.0)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[1].sharey(axes[0])
    for ax, mode in zip(axes, ["forward", "backward"]):
        for key, marker in (("reference", "o"), ("compiled", "s")):
            for dtype, color in DTYPE_COLORS:
                points = sorted(
                    (r["x_bytes"], r["ms"][key][mode] / r["ms"]["fused"][mode]) for r in results if r["dtype"] == dtype
                )
                if points:
                    xs, ys = zip(*points)
                    label = f"over {'torch.compile(ref)' if key == 'compiled' else 'reference'}, {dtype}"
                    ax.scatter(xs, ys, marker=marker, color=color, alpha=0.8 if key == "compiled" else 0.5, label=label)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 12, 20, 30, 50]))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("x size (bytes)")
        ax.set_title(mode)
    axes[0].set_ylabel("speedup of the fused op")
    axes[1].legend(fontsize=7)
    ax = axes[2]
    for layout, marker in (("contiguous", "o"), ("channels_last", "s")):
        for dtype, color in DTYPE_COLORS:
            points = sorted(
                (r["x_bytes"], r["ms"]["fused"]["fwd+bwd"] / r["ms"]["silu"]["fwd+bwd"])
                for r in results
                if r["dtype"] == dtype and r["layout"] == layout
            )
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, marker=marker, color=color, label=f"{dtype}, {layout}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("x size (bytes)")
    ax.set_ylabel("fused time / F.silu time")
    ax.set_title("fwd+bwd, against SiLU (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_list(parser, value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        parser.error(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="two small cases, float32, one round")
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated: float32, bfloat16, float16, float64 (default: float32 on the CPU, "
        "to stay within 4 minutes on 2 cores; float32,bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated, of: " + ", ".join(SIZES) + " (default: all but large on the CPU)",
    )
    parser.add_argument(
        "--layout",
        default="contiguous,channels_last",
        help="comma-separated: contiguous, channels_last (4-D cases only)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch of the ResNet-50 stage and Meta-ACON cases (default 16 on the CPU, 32 on CUDA)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per case (default 2; 1 with --quick)"
    )
    parser.add_argument("--out", default="bench_results", help="folder for results.json and speedup.png")
    parser.add_argument("--no-train", action="store_true", help="skip the training steps (ResNet-18, ShuffleNetV2)")
    parser.add_argument("--no-meta", action="store_true", help="skip the Meta-ACON module cases")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (page faults on every large allocation)",
    )
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible")
    if args.device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("acon::acon_c_forward", "CUDA"):
        parser.error("--device cuda: this build of acon_cuda has no CUDA kernels")
    default_dtypes = "float32" if args.quick or args.device == "cpu" else "float32,bfloat16"
    dtypes = parse_list(parser, args.dtype or default_dtypes, ["float32", "bfloat16", "float16", "float64"], "dtype")
    sizes = (
        parse_list(parser, args.sizes, list(SIZES), "size")
        if args.sizes
        else (QUICK_SIZES if args.quick else DEFAULT_SIZES[args.device])
    )
    layouts = parse_list(parser, args.layout, ["contiguous", "channels_last"], "layout")
    rounds = args.rounds or (1 if args.quick else 2)
    batch = DEFAULT_BATCH[args.device] if args.batch is None else args.batch
    if batch < 1:
        parser.error("--batch must be positive")
    budget_s = 0.02 if args.quick else 0.05
    kept = False if args.system_malloc else keep_freed_memory()

    cases = [
        (name, layout, getattr(torch, dtype))
        for name in sizes
        for dtype in dtypes
        for layout in layouts
        if layout == "contiguous" or len(SIZES[name][0]) == 4
    ]
    info = machine_info(args.device)
    print(
        f"torch {torch.__version__}, device {args.device} "
        f"({info.get('gpu') or info.get('cpu')}), {torch.get_num_threads()} CPU threads, "
        f"malloc keeps freed memory: {kept}",
        file=sys.stderr,
    )
    do_train = not (args.quick or args.no_train)
    do_meta = not (args.quick or args.no_meta)
    total = len(cases) + do_meta + do_train
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": args.device,
        "machine": info,
        "malloc_keeps_freed_memory": kept,
        "args": vars(args),
        "complete": False,
        "wall_s": 0.0,
        "results": [],
        "meta_modules": None,
        "training_steps": None,
    }

    def write(final):
        """results.json and table.txt, after every case: a run cut short
        (a time limit) still leaves what it measured."""
        report["complete"] = final
        report["wall_s"] = time.perf_counter() - started
        text = table(report["results"], args.device)
        if report["meta_modules"] is not None:
            text += "\n" + meta_table(report["meta_modules"])
        if report["training_steps"] is not None:
            text += "\n" + training_table(report["training_steps"], args.device)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "table.txt"), "w") as f:
            f.write(text + "\n")
        return text

    for i, (name, layout, dtype) in enumerate(cases):
        progress(i, total, f"{name} {layout} {dtype}".replace("torch.", ""), started)
        report["results"].append(measure_case(name, layout, dtype, args.device, rounds, budget_s, batch))
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write(final=False)
    if do_meta:
        progress(len(cases), total, "Meta-ACON modules", started)
        report["meta_modules"] = measure_meta_modules(args.device, batch, layouts, rounds, budget_s)
        write(final=False)
    if do_train:
        progress(len(cases) + do_meta, total, "training steps (ResNet-18, ShuffleNetV2)", started)
        report["training_steps"] = measure_training_steps(args.device, steps=3)
    progress(total, total, "done", started)

    text = write(final=True)
    print(text)
    results = report["results"]
    compile_s = ", ".join(f"{r['case']}/{r['layout']}/{r['dtype']} {r['compile_s']:.1f}" for r in results)
    print(f"\ntorch.compile time of the reference, s (not in the timings): {compile_s}")
    plotted = plot(results, os.path.join(args.out, "speedup.png"))
    print(
        f"wrote {args.out}/results.json, table.txt"
        + (", speedup.png" if plotted else " (no speedup.png: matplotlib is not installed)"),
        file=sys.stderr,
    )
    return report
