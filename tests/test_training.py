"""Training for real: the digits example (fused and reference ACON give the
same loss curve) and DistributedDataParallel over two CPU processes."""

import importlib.util
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import acon_cuda
from acon_cuda.testing import TEST_SEED

HERE = os.path.dirname(os.path.abspath(__file__))


def load_example(name):
    path = os.path.join(HERE, "..", "examples", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("activation", ["acon_c", "meta_acon_c"])
def test_digits_example_trains_and_fused_matches_reference(activation):
    pytest.importorskip("sklearn")
    example = load_example("train_digits")
    data = example.load_digits()
    fused = example.train(activation, epochs=3, impl="fused", data=data)
    assert fused["accuracy"] > 0.9, fused["accuracy"]  # chance is 0.1
    losses = torch.tensor(fused["losses"])
    assert losses[-5:].mean() < 0.25 * losses[:5].mean()
    # Same curve, in float64: SGD at these learning rates amplifies rounding
    # differences about 1e5-fold over the ~70 steps (float32 curves drift
    # apart by 1e-2), so only float64 rounding keeps the comparison tight.
    fused = example.train(activation, epochs=3, impl="fused", data=data, dtype=torch.float64)
    ref = example.train(activation, epochs=3, impl="reference", data=data, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(ref["losses"]), rtol=1e-8, atol=1e-10)


def test_digits_example_runs_as_a_script(capsys):
    pytest.importorskip("sklearn")
    load_example("train_digits").main(["--epochs", "1", "--activations", "relu,acon_c"])
    out = capsys.readouterr().out
    assert "relu" in out and "acon_c" in out and "%" in out


STEPS = 3
BATCH = 8


def ddp_model():
    torch.manual_seed(TEST_SEED)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        acon_cuda.AconC(8),
        nn.Conv2d(8, 16, 3, padding=1),
        acon_cuda.MetaAconC(16, r=4, norm=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def ddp_data():
    g = torch.Generator().manual_seed(TEST_SEED + 1)
    return torch.randn(STEPS, BATCH, 3, 9, 9, generator=g), torch.randint(0, 4, (STEPS, BATCH), generator=g)


def train_steps(model, rank, world):
    """SGD steps on this rank's share of each batch; the parameters after each step."""
    xs, ys = ddp_data()
    optimizer = torch.optim.SGD(acon_cuda.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    share = BATCH // world
    history = []
    for step in range(STEPS):
        part = slice(rank * share, (rank + 1) * share)
        loss = F.cross_entropy(model(xs[step, part]), ys[step, part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def ddp_rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(ddp_model())
        torch.save(train_steps(model, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_matches_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    context = mp.start_processes(
        ddp_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the DDP processes did not finish within 180 s")
    single = train_steps(ddp_model(), 0, 1)
    for rank in range(world):
        history = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(history) == STEPS
        for step, (params, expected) in enumerate(zip(history, single)):
            for p, e in zip(params, expected):
                torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6, msg=f"rank {rank}, step {step}")
