"""The report of a run: results.json (the figures, the machine and where the
measured code came from), table.txt (the tables printed at the end, which
benchmarks/readme.py puts into README) and speedup.png.
"""

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time

import torch

import acon_cuda

from .batch_norm_pairs import pair_table
from .op_cases import MODES
from .training import TRAINING_LABELS

# The source checkout the benchmarks run from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# The instruction-set flags the CPU kernel builds and ATen's choice of
# build rest on (/proc/cpuinfo's names): AVX2 and FMA for the AVX2 build;
# AVX-512 F, BW, VL and DQ for the AVX512 one.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")


def cpuinfo(path="/proc/cpuinfo"):
    """The first processor's fields in /proc/cpuinfo ({} where it cannot be read)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends at its blank line
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(info=None):
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    info = cpuinfo() if info is None else info
    return info.get("model name") or platform.processor() or None


def cpu_id(info=None):
    """Vendor, family, model and stepping (/proc/cpuinfo): which generation a
    model name as vague as a virtual machine's ("AMD EPYC") is; None where
    they are not known."""
    info = cpuinfo() if info is None else info
    parts = [info.get(key) for key in ("vendor_id", "cpu family", "model", "stepping")]
    if not any(parts):
        return None
    return "{} family {} model {} stepping {}".format(*(p or "?" for p in parts))


def cpu_flags(info=None):
    """Which of CPU_FLAGS the CPU has ({flag: bool}); None where the flags
    cannot be read (no /proc/cpuinfo)."""
    info = cpuinfo() if info is None else info
    flags = info.get("flags")
    if flags is None:
        return None
    present = set(flags.split())
    return {flag: flag in present for flag in CPU_FLAGS}


def allocator(malloc_keeps_freed_memory):
    """The memory allocator the run's CPU tensors came from: the C library,
    whether the benchmark set glibc's malloc to keep freed memory
    (timing.keep_freed_memory; False under --system-malloc or off glibc), and
    what the environment changes of it (LD_PRELOAD, such as jemalloc or
    tcmalloc; GLIBC_TUNABLES; None where unset)."""
    libc, version = platform.libc_ver()
    return {
        "libc": f"{libc} {version}".strip() or None,
        "keeps_freed_memory": malloc_keeps_freed_memory,
        "ld_preload": os.environ.get("LD_PRELOAD") or None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None,
    }


def git_state(root=ROOT):
    """The checkout's commit (git rev-parse HEAD) and whether its tree differs
    from it (git status --porcelain: changed, staged or untracked files);
    None for what cannot be known (root is no git checkout, git is missing)."""

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def build_info():
    """What acon_cuda/_build_info.py (written by setup.py at build time)
    records of the extension's build, as it is; None without that file."""
    try:
        info = importlib.import_module("acon_cuda._build_info")
    except ImportError:
        return None
    plain = (str, int, float, bool, list, tuple, dict, type(None))
    return {
        name: value if isinstance(value, plain) else repr(value)
        for name, value in vars(info).items()
        if name.isupper() and not name.startswith("_")
    }


def distribution_version():
    try:
        return importlib.metadata.version("acon_cuda")
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance():
    """Where the measured code came from and what it runs on: the checkout's
    commit (and whether it had changes), the package's version and build,
    whether the package was imported from this checkout (else the commit
    describes the benchmarks, not the measured code), the CPU model, the
    build of the CPU kernels that runs, ATen's CPU capability, the
    ATEN_CPU_CAPABILITY that forced them (None where unset), and the compile
    flags of the CPU kernels where the build records them (None where it
    does not); and the CPU: its model, vendor/family/model/stepping, and
    which of CPU_FLAGS it has. (The thread count is the report's
    machine["threads"], the allocator its "allocator".)"""
    info = cpuinfo()
    build = build_info()
    flags = {name: value for name, value in (build or {}).items() if "FLAG" in name or "ARGS" in name}
    package = os.path.realpath(os.path.dirname(acon_cuda.__file__))
    return {
        "git": git_state(),
        "acon_cuda_version": acon_cuda.__version__,
        "acon_cuda_distribution_version": distribution_version(),
        "acon_cuda_from_checkout": os.path.commonpath([package, os.path.realpath(ROOT)]) == os.path.realpath(ROOT),
        "build": build,
        "compile_flags": flags or None,
        "cpu_model": cpu_model(info),
        "cpu_id": cpu_id(info),
        "cpu_flags": cpu_flags(info),
        "cpu_kernel_isa": acon_cuda.cpu_kernel_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY") or None,
    }


def new_report(args, machine, malloc_keeps_freed_memory):
    """results.json's content before the first case: the run's settings,
    machine and provenance; write() fills in the rest."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": args.device,
        "machine": machine,
        "provenance": provenance(),
        "malloc_keeps_freed_memory": malloc_keeps_freed_memory,
        "allocator": allocator(malloc_keeps_freed_memory),
        "args": vars(args),
        "complete": False,
        "wall_s": 0.0,
        "results": [],
        "meta_modules": None,
        "batch_norm_pairs": None,
        "training_steps": None,
    }


def text(report):
    """The tables of what the report holds so far (table.txt)."""
    device = report["device"]
    out = table(report["results"], device)
    if report["meta_modules"] is not None:
        out += "\n" + meta_table(report["meta_modules"])
    if report.get("batch_norm_pairs") is not None:
        out += "\n" + pair_table(report["batch_norm_pairs"])
    if report["training_steps"] is not None:
        out += "\n" + training_table(report["training_steps"], device)
    return out


def write(report, out, started, final):
    """results.json and table.txt in folder out, after every case: a run cut
    short (a time limit) still leaves what it measured. Returns the tables."""
    report["complete"] = final
    report["wall_s"] = time.perf_counter() - started
    tables = text(report)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(tables + "\n")
    return tables
