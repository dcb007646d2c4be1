"""Host cost per call on a tiny tensor, where fixed costs are all there is:

    python -m benchmarks.probes.per_call [--shape 4,64,8,8] [--seconds 2]

Prints, in one run, the fused forward and backward ops alone, acon_c's
forward+backward through torch.autograd.grad (and what autograd adds around
the two ops), F.silu's for scale, and what one Function.apply costs in the
classic form (forward(ctx, ...)) against the modern form (setup_context),
which is why plain eager calls use the classic form (acon_cuda/ops.py).
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import acon_cuda
from acon_cuda import ops


def median_us(stmt, seconds, **names):
    timer = Timer(stmt, globals=names, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median * 1e6


def measure(shape, seconds):
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    p1, p2, beta = (torch.randn(channels, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    names = dict(
        torch=torch,
        F=F,
        acon_cuda=acon_cuda,
        ops=ops,
        x=x,
        p1=p1,
        p2=p2,
        beta=beta,
        grad=grad,
        xd=x.detach(),
        p1d=p1.detach(),
        p2d=p2.detach(),
        betad=beta.detach(),
    )
    t = {
        "forward op": median_us("ops._forward_op(xd, p1d, p2d, betad, 1)", seconds, **names),
        "backward op": median_us("ops._backward_op(grad, xd, p1d, p2d, betad, 1, [True, True])", seconds, **names),
        "fwd+bwd": median_us(
            "torch.autograd.grad(acon_cuda.acon_c(x, p1, p2, beta, 1), (x, p1, p2, beta), grad)", seconds, **names
        ),
        "silu fwd+bwd": median_us("torch.autograd.grad(F.silu(x), (x,), grad)", seconds, **names),
        "apply, classic form": median_us("ops.AconCEagerFunction.apply(x, p1, p2, beta, 1)", seconds, **names),
        "apply, setup_context form": median_us("ops.AconCFunction.apply(x, p1, p2, beta, 1)", seconds, **names),
    }
    t["autograd around the ops"] = t["fwd+bwd"] - t["forward op"] - t["backward op"]
    return t


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.per_call",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", default="4,64,8,8", help="x's shape, channels on axis 1")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    t = measure(shape, args.seconds)
    print(f"x {shape}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, us in t.items():
        print(f"{name:<28} {us:9.1f} us")
    print(f"{'fwd+bwd / silu fwd+bwd':<28} {t['fwd+bwd'] / t['silu fwd+bwd']:9.2f}x")
    return t


if __name__ == "__main__":
    main()
