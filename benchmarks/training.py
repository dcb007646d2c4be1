"""The training steps: one SGD step of torchvision models whose ReLUs are
converted to ACON (the fused op, the reference, the paper's code, Meta-ACON),
against the ReLU and SiLU models.
"""

import statistics

import torch
import torch.nn.functional as F

import acon_cuda

from .paper import PaperAconC, PaperMetaAconC
from .timing import saved_bytes, wall_ms


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
    """Two training steps with every ReLU converted (one ACON per call site),
    as ratios to the stock ReLU model:
    - torchvision ResNet-18 (batch 16, 112x112): the fused AconC, also with
      its BatchNorms fused (``fuse_batchnorm``), the reference ACON, and the
      SiLU model;
    - torchvision ShuffleNetV2 0.5x, the paper's headline model (batch 32,
      160x160, channels_last): SiLU, the paper's eager AconC and MetaAconC,
      and the fused AconC (also with its BatchNorms fused) and MetaAconC."""
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
            ("relu", "silu", "fused", "fused_bn", "reference", "meta", "meta_bn"),
            "relu",
        ),
        (
            "shufflenet_v2_x0_5",
            "torchvision shufflenet_v2_x0_5, ReLU -> AconC, channels_last",
            32,
            160,
            torch.channels_last,
            ("silu", "relu", "paper", "fused", "fused_bn", "paper_meta", "meta", "meta_bn"),
            "relu",
        ),
    ]
    news = {
        "fused": {"impl": "fused"},
        "fused_bn": {"impl": "fused"},
        "reference": {"impl": "reference"},
        "paper": {"new": PaperAconC},
        "meta": {"new": "meta_acon_c"},
        "meta_bn": {"new": "meta_acon_c"},
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
            if variant.endswith("_bn"):
                acon_cuda.fuse_batchnorm(model)
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


# How the report names each variant.
TRAINING_LABELS = {
    "fused": "AconC, fused op",
    "fused_bn": "AconC, fused with BN",
    "reference": "AconC, reference",
    "paper": "AconC, paper's code",
    "relu": "ReLU (no ACON)",
    "silu": "SiLU (no ACON)",
    "meta": "MetaAconC",
    "meta_bn": "MetaAconC, fused with BN",
    "paper_meta": "MetaAconC, paper's code",
}
