"""Puts a benchmark run's table into README.md, so that no figure there is
typed by hand:

    python -m benchmarks --out benchmarks/results/cpu
    python -m benchmarks.readme benchmarks/results/cpu

The README block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
(NAME is the results folder's name) is replaced with the run's command,
machine (CPU model and CPU kernel build in the first line; then the CPU's
family, instruction-set flags, ATen's CPU capability and whether
ATEN_CPU_CAPABILITY forced it, threads, allocator), date, table.txt,
provenance (commit, package version, CPU, kernel build, compile flags) and
speedup.png; "not recorded" stands for what an older results.json lacks.
tests/test_benchmark.py checks that the README still matches the committed
results.
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RECORDED = "not recorded"


def provenance_line(report):
    """Where the run's code came from, from results.json's provenance (a
    report written before it was recorded says "not recorded")."""
    prov = report.get("provenance") or {}
    machine = report.get("machine") or {}
    git = prov.get("git") or {}
    if git.get("commit"):
        dirty = {True: " with uncommitted changes", False: "", None: " (changes not recorded)"}[git.get("dirty")]
        commit = f"`{git['commit'][:12]}`{dirty}"
    else:
        commit = NOT_RECORDED if "git" not in prov else "unknown (not a git checkout)"
    version = prov.get("acon_cuda_version") or "version " + NOT_RECORDED
    if prov.get("acon_cuda_from_checkout") is False:
        version += " (not from this checkout)"
    # Reports before the provenance had the CPU and the kernels' build in "machine".
    cpu = prov.get("cpu_model") or machine.get("cpu") or NOT_RECORDED
    isa = prov.get("cpu_kernel_isa") or machine.get("cpu_kernels") or NOT_RECORDED
    capability = prov.get("aten_cpu_capability") or NOT_RECORDED
    flags = prov.get("compile_flags")
    if flags:
        flags = "; ".join(
            f"{name} `{' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}`" for name, v in flags.items()
        )
    else:
        flags = NOT_RECORDED
    return (
        f"Provenance: commit {commit}; acon_cuda {version}; CPU {cpu}; CPU kernels {isa} "
        f"(ATen CPU capability {capability}); compile flags {flags}."
    )


def cpu_flags_text(prov):
    """Which of the recorded CPU flags the CPU has, and which it lacks."""
    if "cpu_flags" not in prov:
        return "CPU flags " + NOT_RECORDED
    flags = prov["cpu_flags"]
    if not flags:
        return "CPU flags unknown"
    have = " ".join(name for name, present in flags.items() if present)
    lack = " ".join(name for name, present in flags.items() if not present)
    return "; ".join(
        ([f"CPU flags {have}"] if have else ["none of the CPU flags " + lack])
        + ([f"not {lack}"] if have and lack else [])
    )


def allocator_text(report):
    """The allocator: the C library, whether malloc kept freed memory, and
    what LD_PRELOAD / GLIBC_TUNABLES changed; an older report has only the
    malloc setting."""
    alloc = report.get("allocator")
    keeps = (alloc or {}).get("keeps_freed_memory", report.get("malloc_keeps_freed_memory"))
    kept = {True: "set to keep freed memory", False: "left as it is (freed memory returned to the system)"}.get(
        keeps, "freed memory " + NOT_RECORDED
    )
    if alloc is None:
        return f"malloc: {kept}, libc and LD_PRELOAD {NOT_RECORDED}"
    text = f"malloc: {alloc.get('libc') or 'libc unknown'}, {kept}"
    for name, key in (("LD_PRELOAD", "ld_preload"), ("GLIBC_TUNABLES", "glibc_tunables")):
        if alloc.get(key):
            text += f", {name}=`{alloc[key]}`"
    return text


def machine_line(report):
    """The machine the figures came from: CPU model (and family), its
    instruction-set flags, the CPU kernel build that ran, ATen's CPU
    capability and whether ATEN_CPU_CAPABILITY forced it, threads and
    allocator ("not recorded" for what an older results.json lacks)."""
    prov = report.get("provenance") or {}
    machine = report.get("machine") or {}
    cpu = prov.get("cpu_model") or machine.get("cpu") or NOT_RECORDED
    cpu_id = prov.get("cpu_id") or ("family " + NOT_RECORDED if "cpu_id" not in prov else "family unknown")
    isa = prov.get("cpu_kernel_isa") or machine.get("cpu_kernels") or NOT_RECORDED
    capability = prov.get("aten_cpu_capability") or NOT_RECORDED
    if "aten_cpu_capability_env" not in prov:
        env = "ATEN_CPU_CAPABILITY " + NOT_RECORDED
    elif prov["aten_cpu_capability_env"] is None:
        env = "ATEN_CPU_CAPABILITY not set"
    else:
        env = f"forced by ATEN_CPU_CAPABILITY={prov['aten_cpu_capability_env']}"
    threads = f"{machine['threads']} threads" if machine.get("threads") else "threads " + NOT_RECORDED
    if machine.get("cpu_cores"):
        threads += f" on {machine['cpu_cores']} logical CPUs"
    return (
        f"Machine: CPU {cpu} ({cpu_id}); {cpu_flags_text(prov)}; CPU kernels {isa} "
        f"(ATen CPU capability {capability}, {env}); {threads}; {allocator_text(report)}."
    )


def block(results_dir):
    """The README block (markers included) for one results folder."""
    name = os.path.basename(os.path.normpath(results_dir))
    with open(os.path.join(results_dir, "results.json")) as f:
        report = json.load(f)
    with open(os.path.join(results_dir, "table.txt")) as f:
        table = f.read().rstrip()
    machine = report["machine"]
    prov = report.get("provenance") or {}
    cpu = prov.get("cpu_model") or machine.get("cpu") or f"a CPU (model {NOT_RECORDED})"
    isa = prov.get("cpu_kernel_isa") or machine.get("cpu_kernels") or NOT_RECORDED
    where = machine.get("gpu") or f"{cpu}, CPU kernels {isa}, {machine.get('threads')} threads"
    args = report["args"]
    command = "python -m benchmarks" + "".join(
        f" --{key.replace('_', '-')} {value}"
        for key, value in args.items()
        if value not in (None, False) and key not in ("out",)
    ).replace(" True", "")
    rel = os.path.relpath(results_dir, ROOT)
    lines = [
        f"<!-- bench:{name} -->",
        f"From `{command}` on {where}, torch {report['torch']}, {report['date'][:10]} "
        f"(`{rel}/results.json`; {report['wall_s']:.0f} s).",
        "",
        machine_line(report),
        "",
        "```text",
        table,
        "```",
        "",
        provenance_line(report),
        "",
    ]
    if os.path.exists(os.path.join(results_dir, "speedup.png")):
        lines += [f"![speedup of the fused op against tensor size]({rel}/speedup.png)", ""]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def update(readme_text, results_dir):
    name = os.path.basename(os.path.normpath(results_dir))
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if not pattern.search(readme_text):
        raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    return pattern.sub(lambda _: block(results_dir), readme_text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    for results_dir in argv:
        text = update(text, results_dir)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
