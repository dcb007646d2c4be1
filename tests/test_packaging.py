"""Packaging: one version, the build's record of its torch, the import-time
check against another torch, the sdist's contents, and (slow, `make
test-wheel`) a wheel installed into a fresh venv that has only torch."""

import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import torch

import acon_cuda
from acon_cuda import _build, _build_info, _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_installed_distributions():
    assert acon_cuda.__version__ == importlib.metadata.version("acon_cuda")
    major_minor = ".".join(torch.__version__.split(".")[:2])
    assert acon_cuda.__version__.startswith(f"{_version.__version__}+torch{major_minor}.")


def test_version_is_written_in_one_place():
    found = []
    for path in ["setup.py", "pyproject.toml", "Makefile", *glob.glob(os.path.join(ROOT, "acon_cuda", "*.py"))]:
        path = os.path.join(ROOT, path)
        if os.path.basename(path) in ("_version.py", "_build_info.py"):
            continue
        with open(path) as f:
            if re.search(rf"\b{re.escape(_version.__version__)}\b", f.read()):
                found.append(path)
    assert found == []


def test_build_records_the_torch_and_cuda_it_was_built_against():
    assert _build.major_minor(_build_info.TORCH_VERSION) == _build.major_minor(torch.__version__)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("acon::acon_c_forward", "CUDA")
    assert _build_info.CUDA_VERSION == (torch.version.cuda if has_cuda_kernels else None)
    assert acon_cuda.__version__.endswith("cpu" if not has_cuda_kernels else "cu" + torch.version.cuda.replace(".", ""))


@pytest.mark.parametrize(
    "built, running, words",
    [
        (("2.13.0", None), ("2.14.1+cu130", "13.0"), "built against torch 2.13 (2.13.0), but torch 2.14.1+cu130"),
        (
            ("2.14.1+cu126", "12.6"),
            ("2.14.1+cu130", "13.0"),
            "built for CUDA 12.6, but torch 2.14.1+cu130 uses CUDA 13.0",
        ),
        (("2.14.1+cu130", "13.0"), ("2.14.0+cpu", None), "CPU-only build"),
    ],
    ids=["other_torch", "other_cuda", "cpu_only_torch"],
)
def test_another_torch_gets_a_clear_import_error(monkeypatch, built, running, words):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", built[0])
    monkeypatch.setattr(_build_info, "CUDA_VERSION", built[1])
    monkeypatch.setattr(torch, "__version__", running[0])
    monkeypatch.setattr(torch.version, "cuda", running[1])
    with pytest.raises(ImportError, match="Rebuild it against the installed torch") as error:
        _build.check_build()
    assert words in str(error.value)


def test_same_torch_with_another_patch_release_loads():
    assert _build.mismatch("2.14.0+cu130", "13.0", "2.14.1+cu130", "13.1") is None
    assert _build.mismatch("2.14.1+cu130", None, "2.14.1+cu130", "13.0") is None  # CPU kernels only


def test_sdist_holds_what_a_build_needs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sdist,) = tmp_path.glob("acon_cuda-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in [
        "setup.py",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "MANIFEST.in",
        "acon_cuda/_version.py",
        "acon_cuda/ops.py",
        "csrc/acon.cpp",
        "csrc/acon_c.h",
        "csrc/cpu/acon_c_kernel.h",
        "csrc/cpu/acon_c_kernel_impl.h",
        "csrc/cuda/acon_c_cuda.cu",
        "csrc/cuda/acon_c_kernel.cuh",
        "csrc/cuda/acon_c_launch.h",
        "csrc/cuda/acon_c_emulation.cpp",
        "tests/test_acon_c.py",
    ]:
        assert needed in names, needed
    assert not any(name.endswith(".so") or name.endswith("_build_info.py") for name in names)


SMOKE = textwrap.dedent(
    """
    import torch, acon_cuda
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    p1, p2, beta = torch.randn(8), torch.randn(8), torch.rand(8)
    y = acon_cuda.acon_c(x, p1, p2, beta)
    torch.testing.assert_close(y, acon_cuda.reference.acon_c(x, p1, p2, beta, 1))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), acon_cuda.AconC(), torch.nn.Conv2d(8, 8, 1),
                                acon_cuda.MetaAconC())
    model(torch.randn(4, 3, 9, 9)).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    print(acon_cuda.__version__, acon_cuda.__file__, acon_cuda.cpu_kernel_isa())
    """
)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_only_torch(tmp_path):
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), ROOT],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    (wheel,) = dist.glob("acon_cuda-*.whl")
    assert f"+{acon_cuda.__version__.split('+')[1]}-" in wheel.name  # torch and CUDA in the file name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(re.match(r"acon_cuda/_C\..*\.so$", n) for n in names) and "acon_cuda/_build_info.py" in names
    assert not any(n.startswith(("csrc/", "tests/")) for n in names)

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=1200)
    subprocess.run(pip + ["--no-deps", str(wheel)], check=True, timeout=300)
    # No compiler on PATH, no source tree on sys.path, no CUDA_HOME.
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", SMOKE],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    version, location, _ = done.stdout.split()
    assert version == acon_cuda.__version__
    assert location.startswith(str(venv))
