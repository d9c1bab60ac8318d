"""A parameter server on point-to-point messages: SGD on a least-squares problem.

Rank 0 holds the parameters; every other rank sends the gradient of its shard of the data,
rank 0 averages them as they arrive and replies with the new parameters.
"""

import numpy as np

import sparsecoll

GRADIENT, PARAMETERS = 1, 2  # tags: gradients go to the server, parameters come back


def shard(rank: int, rows: int = 64, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``rank``'s rows of one noisy linear model shared by all workers."""
    true_weights = np.random.default_rng(0).normal(size=dim)
    rng = np.random.default_rng(rank)
    features = rng.normal(size=(rows, dim))
    return features, features @ true_weights + 0.1 * rng.normal(size=rows)


async def serve(group: sparsecoll.Group, steps: int, lr: float, dim: int = 8) -> np.ndarray:
    """Average one gradient per worker, take an SGD step, send the parameters back."""
    params = np.zeros(dim)
    workers = range(1, group.size)
    for _ in range(steps):
        total = np.zeros(dim)
        for _ in workers:  # in whatever order the workers finish
            message = await group.recv(sparsecoll.ANY_SOURCE, tag=GRADIENT)
            total += message.value
        params -= lr * total / len(workers)
        await sparsecoll.wait_all([group.isend(params, w, tag=PARAMETERS) for w in workers])
    return params


async def work(group: sparsecoll.Group, steps: int) -> tuple[list[float], np.ndarray]:
    """Send this shard's gradient, wait for the new parameters; return the losses seen."""
    features, targets = shard(group.rank)
    params, losses = np.zeros(features.shape[1]), []
    for _ in range(steps):
        residual = features @ params - targets
        losses.append(float(residual @ residual) / (2 * len(targets)))
        await group.send(features.T @ residual / len(targets), 0, tag=GRADIENT)
        params = (await group.recv(0, tag=PARAMETERS)).value
    return losses, params


async def main(group: sparsecoll.Group, steps: int = 30, lr: float = 0.5):
    """Rank 0 serves, the others train."""
    if group.rank == 0:
        return await serve(group, steps, lr)
    return await work(group, steps)


if __name__ == "__main__":
    from sparsecoll.launch import spawn

    params, *workers = spawn(3, main, group_kwargs={})
    print("parameters:", params.round(3), "\nworker 1 losses:", workers[0][0][::5])
