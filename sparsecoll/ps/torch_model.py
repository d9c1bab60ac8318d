"""AsyLPG for a torch model from a plain (synchronous) training loop.

On the server rank ``serve_model(sync_group, model, config)`` serves the model's parameters
until every worker is done and loads the result into ``model``. On a worker rank::

    worker = ModelWorker(sync_group, model, config)   # pulls: the model now holds Q(x)
    for inputs, targets in batches:
        model.zero_grad()
        loss_fn(model(inputs), targets).backward()
        worker.step()                                   # push Q(grad), load the next Q(x)
    worker.close()
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from sparsecoll.sync import SyncGroup

from .config import AsyLPGConfig
from .server import ServerStats, serve
from .worker import Worker


def _parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def serve_model(group: SyncGroup, model: torch.nn.Module, config: AsyLPGConfig, *,
                timeout: float | None = None) -> ServerStats:
    """Serve ``model``'s parameters to every other rank; loads the final ones into ``model``.

    With ``config.num_servers`` > 1 call it on every server rank (0 .. n-1): each serves its
    shard, and each loads the whole final model.
    """
    params = _parameters(model)
    initial = parameters_to_vector(params).detach().cpu().double().numpy()
    final, stats = group.run(serve(group.group, initial, config, timeout=timeout))
    with torch.no_grad():
        vector_to_parameters(torch.from_numpy(final).to(params[0]), params)
    return stats


class ModelWorker:
    """A worker whose ``model`` always holds the quantized parameters it computes gradients at."""

    def __init__(self, group: SyncGroup, model: torch.nn.Module, config: AsyLPGConfig, *,
                 server: int = 0, timeout: float | None = None) -> None:
        self.group = group
        self.params = _parameters(model)
        size = sum(param.numel() for param in self.params)
        self.worker = Worker(group.group, size, config, server=server, timeout=timeout)
        self._load(group.run(self.worker.pull()))

    @property
    def stats(self):
        """The underlying :class:`~sparsecoll.ps.WorkerStats`."""
        return self.worker.stats

    def step(self) -> None:
        """Push the model's gradients (zeros where a parameter has none) and load the next Q(x)."""
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self.params]
        flat = parameters_to_vector(grads).detach().cpu().double().numpy()
        self._load(self.group.run(self.worker.push(flat)))

    def close(self) -> None:
        """Tell the server this worker is done."""
        self.group.run(self.worker.close())

    def _load(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            vector_to_parameters(torch.from_numpy(flat).to(self.params[0]), self.params)
