"""What the SiLU ShuffleNetV2 model pays for mixed memory layouts.

``python -m benchmarks.probes.batchnorm_layouts`` runs one backward of torchvision's
ShuffleNetV2 0.5x (batch 32, 160x160, channels_last, as in ``make bench``'s
training step) per activation, counts the BatchNorm backwards whose incoming
gradient is contiguous while their input is channels_last, and times
PyTorch's BatchNorm backward on those shapes with a channels_last and with a
contiguous gradient, in one run: the difference, summed over the mixed
calls, is what that model's step pays for them.
"""

import collections
import statistics

import torch
import torch.nn.functional as F
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode

import acon_cuda

BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


class BatchNormGradLayouts(TorchDispatchMode):
    """Counts BatchNorm backwards by (mixed layouts, input shape)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is BN_BACKWARD:
            grad, x = args[0], args[1]
            mixed = x.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous(
                memory_format=torch.channels_last
            )
            self.calls[(mixed, tuple(x.shape))] += 1
        return func(*args, **(kwargs or {}))


def model(variant, x):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5().to(memory_format=torch.channels_last)
    if variant == "silu":
        return acon_cuda.convert_activations(net, new=lambda: torch.nn.SiLU())
    if variant == "meta_acon_c":
        return acon_cuda.convert_activations(net, example_input=x[:2], new="meta_acon_c")
    return net  # relu


def batch_norm_backward_ms(shape, grad_format):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight = torch.ones(channels)
    mean, invstd = x.mean((0, 2, 3)), torch.rand(channels) + 0.5
    grad = torch.randn(shape).contiguous(memory_format=grad_format)
    timer = benchmark.Timer(
        "f(grad, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True])",
        globals={"f": BN_BACKWARD, "grad": grad, "x": x, "weight": weight, "mean": mean, "invstd": invstd},
        num_threads=torch.get_num_threads(),
    )
    return statistics.median(timer.blocked_autorange(min_run_time=0.3).times) * 1e3


def main():
    x = torch.randn(32, 3, 160, 160).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (32,))
    mixed_shapes = collections.Counter()
    for variant in ("silu", "relu", "meta_acon_c"):
        loss = F.cross_entropy(model(variant, x)(x), target)
        with BatchNormGradLayouts() as seen:
            loss.backward()
        mixed = sum(n for (is_mixed, _), n in seen.calls.items() if is_mixed)
        print(f"{variant:<12} BatchNorm backwards: {sum(seen.calls.values())}, with a contiguous gradient: {mixed}")
        if variant == "silu":
            mixed_shapes = collections.Counter({shape: n for (is_mixed, shape), n in seen.calls.items() if is_mixed})
    print(f"\n{'shape':<20} {'calls':>5} {'channels_last ms':>17} {'contiguous ms':>14}")
    extra = 0.0
    for shape, n in sorted(mixed_shapes.items()):
        same = batch_norm_backward_ms(shape, torch.channels_last)
        mixed = batch_norm_backward_ms(shape, torch.contiguous_format)
        extra += n * (mixed - same)
        print(f"{'x'.join(map(str, shape)):<20} {n:>5} {same:>17.3f} {mixed:>14.3f}")
    print(f"\nThe SiLU model's backward pays about {extra:.1f} ms per step for its mixed layouts.")


if __name__ == "__main__":
    main()
