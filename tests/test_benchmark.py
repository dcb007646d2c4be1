"""The benchmark cannot rot: --quick runs here, and README's figures are the
committed results' (benchmarks/readme.py writes them, never a hand)."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import readme  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of the smallest case (both layouts), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--sizes",
            "small",
            "--layout",
            "contiguous,channels_last",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_quick_benchmark_runs_and_writes_its_outputs(quick_run):
    out, done = quick_run
    assert "vs compile" in done.stdout and "%copy" in done.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["torch"] and report["machine"] and report["device"] == "cpu" and report["complete"]
    assert len(report["results"]) == 2
    for r in report["results"]:
        for key in ("fused", "paper", "reference", "compiled", "silu"):
            for mode in ("forward", "backward", "fwd+bwd"):
                assert r["ms"][key][mode] > 0
                # GB/s is derived from the same run's time, never typed in:
                # x-sized and beta-sized tensors moved, over the time.
                moved = {"forward": 2, "backward": 3, "fwd+bwd": 5}[mode] * r["x_bytes"] + {
                    "forward": 1,
                    "backward": 2,
                    "fwd+bwd": 3,
                }[mode] * r["beta_bytes"]
                expected = moved / (r["ms"][key][mode] * 1e6)
                assert r["gbps"][key][mode] == pytest.approx(expected)
        assert r["saved_bytes"]["fused"] < r["saved_bytes"]["reference"]
    assert (out / "table.txt").read_text() in done.stdout
    # stderr is no terminal here: plain progress lines, no bar redrawn with \r.
    assert "[0/2]" in done.stderr and "[2/2]" in done.stderr and "\r" not in done.stderr
    pytest.importorskip("matplotlib")
    assert (out / "speedup.png").stat().st_size > 1000


def test_results_record_their_provenance(quick_run):
    import torch

    import acon_cuda

    out, _ = quick_run
    prov = json.loads((out / "results.json").read_text())["provenance"]
    assert set(prov) >= {
        "git",
        "acon_cuda_version",
        "acon_cuda_distribution_version",
        "acon_cuda_from_checkout",
        "build",
        "compile_flags",
        "cpu_model",
        "cpu_id",
        "cpu_flags",
        "cpu_kernel_isa",
        "aten_cpu_capability",
        "aten_cpu_capability_env",
    }
    assert set(prov["git"]) == {"commit", "dirty"}
    if prov["git"]["commit"] is not None:  # a git checkout (not, say, an unpacked sdist)
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git"]["commit"]) and isinstance(prov["git"]["dirty"], bool)
    assert prov["acon_cuda_version"] == acon_cuda.__version__
    assert prov["cpu_kernel_isa"] == acon_cuda.cpu_kernel_isa()
    assert prov["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["aten_cpu_capability_env"] == (os.environ.get("ATEN_CPU_CAPABILITY") or None)
    if prov["cpu_flags"] is not None:  # /proc/cpuinfo was readable
        assert set(prov["cpu_flags"]) == {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
        assert all(isinstance(v, bool) for v in prov["cpu_flags"].values())
    report = json.loads((out / "results.json").read_text())
    assert isinstance(report["machine"]["threads"], int) and report["machine"]["threads"] > 0
    assert set(report["allocator"]) == {"libc", "keeps_freed_memory", "ld_preload", "glibc_tunables"}
    assert report["allocator"]["keeps_freed_memory"] == report["malloc_keeps_freed_memory"]
    line = readme.provenance_line(report)
    assert prov["acon_cuda_version"] in line and prov["cpu_kernel_isa"] in line
    # The README block's header names the machine and the kernel build.
    header = readme.block(str(out)).split("```")[0]
    assert f"on {prov['cpu_model']}, CPU kernels {prov['cpu_kernel_isa']}," in header
    assert f"ATen CPU capability {prov['aten_cpu_capability']}" in header and "not recorded" not in header


def test_provenance_outside_a_git_checkout(tmp_path):
    from benchmarks import report

    assert report.git_state(str(tmp_path)) == {"commit": None, "dirty": None}


def test_readme_says_what_an_old_report_did_not_record():
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu", "results.json")) as f:
        old = json.load(f)
    old.pop("provenance", None)
    line = readme.provenance_line(old)
    assert "commit not recorded" in line and "compile flags not recorded" in line
    for key in ("allocator", "machine"):
        old.pop(key, None)
    line = readme.machine_line(old)
    for what in (
        "CPU not recorded",
        "CPU flags not recorded",
        "ATEN_CPU_CAPABILITY not recorded",
        "threads not recorded",
    ):
        assert what in line


def test_bad_arguments_are_refused():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--sizes", "huge"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "unknown size" in done.stderr


def test_readme_figures_come_from_the_committed_results():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    names = re.findall(r"<!-- bench:([\w-]+) -->", text)
    assert names, "README.md has no benchmark block"
    for name in names:
        results_dir = os.path.join(ROOT, "benchmarks", "results", name)
        assert readme.block(results_dir) in text, (
            f"README's {name} block differs from {results_dir}; run python -m benchmarks.readme"
        )


def test_per_call_script_runs():
    from benchmarks.probes import per_call

    t = per_call.main(["--shape", "2,3,4", "--seconds", "0.01"])
    assert all(v > 0 for k, v in t.items() if k != "autograd around the ops")


def test_meta_floor_script_runs(capsys):
    from benchmarks.probes import meta_floor

    ms = meta_floor.main(["--shape", "2x32x3x3", "--layout", "channels_last", "--rounds", "1", "--seconds", "0.005"])
    assert len(ms) == 7 and all(t > 0 for t in ms.values())
    assert "floor (sum of the parts)" in capsys.readouterr().out


def test_batch_norm_parts_script_runs(capsys):
    from benchmarks.probes import batch_norm_parts

    ms = batch_norm_parts.main(["--shape", "2,8,3,3", "--seconds", "0.01"])
    assert all(t > 0 for t in ms.values())
    assert "BatchNorm + ReLU, fwd+bwd" in capsys.readouterr().out


def test_meta_acon_module_cases_run(monkeypatch):
    from benchmarks import meta_modules, report

    monkeypatch.setattr(meta_modules, "META_SHAPES", [(None, 16, 5, 5)])
    rows = meta_modules.measure_meta_modules("cpu", 2, ["contiguous", "channels_last"], rounds=1, budget_s=0.005)
    assert [r["layout"] for r in rows] == ["contiguous", "channels_last"]
    assert all(t > 0 for r in rows for t in r["ms"].values())
    # The fused MetaAconC keeps x (and small tensors); the paper's keeps several x-sized ones.
    assert all(r["saved_bytes"]["meta_acon_c"] < r["saved_bytes"]["paper_meta_acon_c"] for r in rows)
    text = report.meta_table(rows)
    assert "2x16x5x5" in text and "paper / it" in text


def test_compute_floor_script_runs(capfd, monkeypatch):
    import torch

    import acon_cuda
    from benchmarks.probes import compute_floor

    rows = compute_floor.main(["--repeat", "1", "--calls", "2"])
    assert [r["case"] for r in rows] == [name for name, _, _ in compute_floor.CASES]
    assert all(t > 0 for r in rows for t in r["ns"].values())
    out = capfd.readouterr().out
    assert f"CPU kernels {acon_cuda.cpu_kernel_isa()}" in out and "ratio" in out
    # --isa-all: one table per build, each in its own process (here the
    # baseline build only, which every CPU runs, to stay fast).
    monkeypatch.setattr(compute_floor, "ISAS", ("default",))
    assert compute_floor.main(["--isa-all", "--repeat", "1", "--calls", "2"]) == ["default"]
    out = capfd.readouterr().out
    assert "CPU kernels DEFAULT (ATen CPU capability DEFAULT, ATEN_CPU_CAPABILITY=default)" in out
    # A build PyTorch does not run in this process is skipped, not measured.
    other = "avx2" if torch.backends.cpu.get_cpu_capability() == "DEFAULT" else "default"
    with pytest.raises(SystemExit) as exit:
        compute_floor.main(["--repeat", "1", "--calls", "1", "--require-capability", other])
    assert exit.value.code == compute_floor.SKIPPED and "skipped" in capfd.readouterr().out


def test_batch_norm_pair_cases_report_their_own_measurements():
    """The pair table's ratios come from the run's times; the fused pair keeps
    x for the backward, the unfused pair the BatchNorm's output as well."""
    from benchmarks.batch_norm_pairs import PAIR_MODES, measure_batch_norm_pairs, pair_table

    rows = measure_batch_norm_pairs("cpu", rounds=1, budget_s=0.01, cases=[((4, 8, 6, 5), "channels_last")])
    (row,) = rows
    for key in ("fused", "bn_acon_c", "bn_relu", "silu"):
        for mode in PAIR_MODES:
            assert row["ms"][key][mode] > 0
    # Beside x, per-channel tensors only (parameters, statistics).
    assert row["x_bytes"] <= row["saved_bytes"]["fused"] < 1.5 * row["x_bytes"]
    assert row["saved_bytes"]["bn_acon_c"] >= 2 * row["x_bytes"]
    text = pair_table(rows)
    fused = row["ms"]["fused"]["fwd+bwd"]
    assert f"{fused / row['ms']['bn_relu']['fwd+bwd']:.2f}" in text


def test_inductor_cache_per_cpu_capability(monkeypatch):
    """The benchmark, like the tests, compiles into one inductor cache per
    ATEN_CPU_CAPABILITY (a shared one made =default fail to compile), and
    leaves a cache folder that is set alone."""
    from acon_cuda.testing import use_inductor_cache_per_cpu_capability
    from benchmarks import cli

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.path.basename(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == "torchinductor_acon_default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    use_inductor_cache_per_cpu_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
