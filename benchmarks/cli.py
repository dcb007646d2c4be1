"""Fused ACON-C against what people use instead: the paper's public code, the
plain-PyTorch reference (d*x formed once), torch.compile of the reference,
F.silu (one transcendental per element: the floor for this kind of op) and a
copy of x (the memory floor). Forward, backward (from the forward's saved
state) and forward+backward, each timed on its own.

Every figure is measured in this run: medians of interleaved rounds, after
warm-up, with inputs rotated so that no contender runs from a warm cache.
"""

import argparse
import os
import sys
import time

import torch

import acon_cuda
from acon_cuda.testing import use_inductor_cache_per_cpu_capability

from . import report as reports
from .batch_norm_pairs import measure_batch_norm_pairs
from .meta_modules import measure_meta_modules
from .op_cases import DEFAULT_BATCH, DEFAULT_SIZES, QUICK_SIZES, SIZES, measure_case
from .progress import Progress
from .timing import keep_freed_memory
from .training import measure_training_steps


def parse_list(parser, value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        parser.error(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    use_inductor_cache_per_cpu_capability()
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
        "--no-batchnorm", action="store_true", help="skip the BatchNorm pair cases (fused BatchNorm + AconC)"
    )
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
    info = reports.machine_info(args.device)
    print(
        f"torch {torch.__version__}, device {args.device} "
        f"({info.get('gpu') or info.get('cpu')}), CPU kernels {acon_cuda.cpu_kernel_isa()} "
        f"(ATen {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} CPU threads, "
        f"malloc keeps freed memory: {kept}",
        file=sys.stderr,
    )
    do_train = not (args.quick or args.no_train)
    do_meta = not (args.quick or args.no_meta)
    do_pairs = not (args.quick or args.no_batchnorm)
    total = len(cases) + do_meta + do_pairs + do_train
    os.makedirs(args.out, exist_ok=True)
    # The provenance (git status included) is taken before the first write:
    # a run into the committed results folder must not see its own files.
    report = reports.new_report(args, info, kept)
    started = time.perf_counter()

    def write(final):
        return reports.write(report, args.out, started, final)

    progress = Progress(total)
    for i, (name, layout, dtype) in enumerate(cases):
        progress.at(i, f"{name} {layout} {dtype}".replace("torch.", ""))
        report["results"].append(measure_case(name, layout, dtype, args.device, rounds, budget_s, batch))
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write(final=False)
    if do_meta:
        progress.at(len(cases), "Meta-ACON modules")
        report["meta_modules"] = measure_meta_modules(args.device, batch, layouts, rounds, budget_s)
        write(final=False)
    if do_pairs:
        progress.at(len(cases) + do_meta, "BatchNorm pairs")
        report["batch_norm_pairs"] = measure_batch_norm_pairs(args.device, rounds, budget_s)
        write(final=False)
    if do_train:
        progress.at(len(cases) + do_meta + do_pairs, "training steps (ResNet-18, ShuffleNetV2)")
        report["training_steps"] = measure_training_steps(args.device, steps=3)
    progress.close()

    text = write(final=True)
    print(text)
    results = report["results"]
    compile_s = ", ".join(f"{r['case']}/{r['layout']}/{r['dtype']} {r['compile_s']:.1f}" for r in results)
    print(f"\ntorch.compile time of the reference, s (not in the timings): {compile_s}")
    plotted = reports.plot(results, os.path.join(args.out, "speedup.png"))
    print(
        f"wrote {args.out}/results.json, table.txt"
        + (", speedup.png" if plotted else " (no speedup.png: matplotlib is not installed)"),
        file=sys.stderr,
    )
    return report
