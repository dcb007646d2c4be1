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


def test_quick_benchmark_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "bench"
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
    assert "vs compile" in done.stdout and "%copy" in done.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["torch"] and report["machine"] and report["device"] == "cpu"
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
    pytest.importorskip("matplotlib")
    assert (out / "speedup.png").stat().st_size > 1000


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
    from benchmarks import per_call

    t = per_call.main(["--shape", "2,3,4", "--seconds", "0.01"])
    assert all(v > 0 for k, v in t.items() if k != "autograd around the ops")


def test_meta_floor_script_runs(capsys):
    from benchmarks import meta_floor

    ms = meta_floor.main(["--shape", "2x32x3x3", "--layout", "channels_last", "--rounds", "1", "--seconds", "0.005"])
    assert len(ms) == 7 and all(t > 0 for t in ms.values())
    assert "floor (sum of the parts)" in capsys.readouterr().out


def test_meta_acon_module_cases_run(monkeypatch):
    from benchmarks import bench_acon

    monkeypatch.setattr(bench_acon, "META_SHAPES", [(None, 16, 5, 5)])
    rows = bench_acon.measure_meta_modules("cpu", 2, ["contiguous", "channels_last"], rounds=1, budget_s=0.005)
    assert [r["layout"] for r in rows] == ["contiguous", "channels_last"]
    assert all(t > 0 for r in rows for t in r["ms"].values())
    # The fused MetaAconC keeps x (and small tensors); the paper's keeps several x-sized ones.
    assert all(r["saved_bytes"]["meta_acon_c"] < r["saved_bytes"]["paper_meta_acon_c"] for r in rows)
    text = bench_acon.meta_table(rows)
    assert "2x16x5x5" in text and "paper / it" in text
