"""Train a small CNN on scikit-learn's 8x8 digits (1,797 images, shipped
inside scikit-learn) with ReLU, Swish (SiLU), ACON-C and Meta-ACON, and print
test accuracy and time per epoch for each.

    python examples/train_digits.py [--epochs 15] [--impl fused|reference]

The ACON parameters are kept out of weight decay with acon_cuda.param_groups,
as the paper's training code does.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import acon_cuda

ACTIVATIONS = {
    "relu": lambda impl: nn.ReLU(),
    "swish": lambda impl: nn.SiLU(),
    "acon_c": lambda impl: acon_cuda.AconC(impl=impl),
    "meta_acon_c": lambda impl: acon_cuda.MetaAconC(r=4, impl=impl),
}


def load_digits(test_fraction=0.2, seed=0):
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1], (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model(activation, impl="fused"):
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        act(impl),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        act(impl),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        act(impl),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(activation, epochs=15, impl="fused", seed=0, batch_size=64, data=None, dtype=torch.float32):
    """Trains one model; returns its per-step losses, test accuracy and the
    seconds per epoch."""
    x_train, y_train, x_test, y_test = data or load_digits()
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(seed)
    model = make_model(activation, impl).to(dtype)
    model(x_train[:2])  # materialise the lazy ACON modules before the optimizer
    optimizer = torch.optim.SGD(acon_cuda.param_groups(model, 5e-4), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.1, total_steps=epochs * -(-len(y_train) // batch_size)
    )
    shuffle = torch.Generator().manual_seed(seed)
    losses, epoch_s = [], []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for batch in torch.randperm(len(y_train), generator=shuffle).split(batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        epoch_s.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"losses": losses, "accuracy": accuracy, "epoch_s": epoch_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--impl", default="fused", choices=["fused", "reference"], help="how ACON is computed")
    parser.add_argument(
        "--activations", default=",".join(ACTIVATIONS), help="comma-separated: " + ", ".join(ACTIVATIONS)
    )
    args = parser.parse_args(argv)
    data = load_digits()
    print(
        f"digits: {len(data[1])} training and {len(data[3])} test images, {args.epochs} epochs, "
        f"ACON computed by the {args.impl} op, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'activation':<12} {'test accuracy':>13} {'s / epoch':>10} {'final loss':>11}")
    for name in args.activations.split(","):
        result = train(name.strip(), args.epochs, args.impl, data=data)
        seconds = sorted(result["epoch_s"])[len(result["epoch_s"]) // 2]  # median epoch
        print(f"{name:<12} {100 * result['accuracy']:12.1f}% {seconds:10.3f} {result['losses'][-1]:11.4f}")


if __name__ == "__main__":
    main()
