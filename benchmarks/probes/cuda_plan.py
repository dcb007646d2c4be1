"""The CUDA launch plan for a set of training shapes on an H200-sized GPU, without
a GPU (CUDA builds only): python -m benchmarks.probes.cuda_plan [forward] [blocks_per_sm]

Prints, per case and dtype, the backward's (or forward's) main kernel (grid, work items,
teams per block, turns, busy lanes), its reduce (grid, the most partial sums one lane
adds) and its workspace (bytes, and as a share of the bytes the backward moves: x,
grad_y, grad_x), from torch.ops.acon._acon_c_cuda_launch_plan.
"""

import math
import sys

import torch

import acon_cuda  # noqa: F401  (registers the ops)
from acon_cuda.testing import has_cuda_test_hooks

H200_MULTIPROCESSORS = 132
FIELDS = ["kind", "grid", "threads", "items", "teams_per_block", "most_items", "busy_or_longest", "lanes"]
CASES = [
    ((32, 256, 56, 56), "contiguous", False),
    ((32, 256, 56, 56), "channels_last", False),
    ((16, 2048, 7, 7), "contiguous", True),
    ((16, 2048, 7, 7), "channels_last", False),
    ((16, 2048, 7, 7), "channels_last", True),
    ((64, 64, 7, 7), "contiguous", True),
    ((1, 64, 512, 512), "contiguous", False),
    ((256, 4, 16), "features_last", True),
    ((256, 4096), "contiguous", False),
    ((256, 4096), "contiguous", True),
    ((32, 768, 197), "features_last", False),
]


def plan(x, channel_dim, per_sample, backward, blocks_per_sm):
    c = x.shape[channel_dim]
    beta = torch.ones((x.shape[0], c) if per_sample else (c,), dtype=x.dtype)
    flat = torch.ops.acon._acon_c_cuda_launch_plan(x, beta, channel_dim, backward, H200_MULTIPROCESSORS, blocks_per_sm)
    workspace = flat.pop() if backward else None  # a backward's list ends with its workspace's bytes
    return [dict(zip(FIELDS, flat[i : i + len(FIELDS)])) for i in range(0, len(flat), len(FIELDS))], workspace


def main():
    if not has_cuda_test_hooks():
        sys.exit("this build has no CUDA kernels")
    args = sys.argv[1:]
    backward = "forward" not in args
    numbers = [a for a in args if a != "forward"]
    blocks_per_sm = int(numbers[0]) if numbers else 3
    direction = "backward" if backward else "forward"
    print(f"H200: {H200_MULTIPROCESSORS} multiprocessors x {blocks_per_sm} blocks of 256 threads; {direction}")
    print(
        "| case | dtype | main kernel | grid | items | teams/block | turns | busy lanes | reduce grid | longest lane "
        "| workspace | of traffic |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, layout, per_sample in CASES:
        for dtype in [torch.float32, torch.bfloat16]:
            if layout == "features_last":
                x, cdim = torch.empty(shape[0], *shape[2:], shape[1], dtype=dtype), -1
            else:
                x, cdim = torch.empty(shape, dtype=dtype), 1
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
            (main_kernel, *reduce), workspace = plan(x, cdim, per_sample, backward, blocks_per_sm)
            reduce = reduce[0] if reduce else {"grid": "-", "busy_or_longest": "-"}
            if workspace is None:
                space = share = "-"
            else:
                space = f"{workspace / 1024:.0f} KiB"
                share = f"{100 * workspace / (3 * x.numel() * x.element_size()):.2f}%"
            turns = math.ceil(main_kernel["items"] / (main_kernel["grid"] * main_kernel["teams_per_block"]))
            kind = "runs" if main_kernel["kind"] == 0 else "columns"
            print(
                f"| {'x'.join(map(str, shape))} {layout}{' per-sample β' if per_sample else ''} "
                f"| {str(dtype).replace('torch.', '')} | {kind} | {main_kernel['grid']} | {main_kernel['items']} "
                f"| {main_kernel['teams_per_block']} | {turns} | {main_kernel['busy_or_longest'] / 10:.1f}% "
                f"| {reduce['grid']} | {reduce['busy_or_longest']} | {space} | {share} |"
            )


if __name__ == "__main__":
    main()
