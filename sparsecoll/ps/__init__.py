"""An asynchronous parameter server with double quantization (AsyLPG; Yu, Wu & Huang, NeurIPS 2019).

One rank (the server) keeps the model in full precision; every other rank is a worker that
computes gradients at a low-precision copy of it. Both directions are quantized: parameters to
``param_bits`` on their way to a worker, gradients to ``grad_bits`` on their way back, so a
step moves about ``(param_bits + grad_bits) / 64`` of the bytes of full precision. The server
applies each gradient as it arrives, from whichever worker sent it: no barrier.

The algorithm, as the code follows it (server rank S, workers w, version t = updates so far):

1. Worker w pulls: S sends x̂ = Q_param(x_t) with its version t (``Worker.pull``).
2. w computes a stochastic gradient g at x̂ (its own minibatch) and compresses it:
   Q_grad(g), b-bit stochastic rounding with a float32 scale per block (unbiased); with
   ``density`` < 1 first the top-k of g plus w's error-feedback residual (Sparse-AsyLPG),
   sent as uint32 indices and b-bit values (``Worker.push``).
3. S receives pushes from any worker in arrival order. A push computed at version t' is
   refused if t - t' > τ (``staleness``, the paper's delay bound); otherwise S steps
   y_{t+1} = x_t - η Q_grad(g) and x_{t+1} = y_{t+1} + β (y_{t+1} - y_t) (β = ``momentum``:
   accelerated AsyLPG's Nesterov extrapolation; β = 0 is AsyLPG's plain step), t += 1.
4. S answers every push with Q_param(x) at its current version (marked refused or not), and w
   goes back to step 2 at those parameters. With ``param_encoding="delta"`` (default) the
   quantized message is x minus w's previous copy, so w's copy is exact up to one rounding of
   the change since its last pull; ``"direct"`` rounds x itself each time.
5. A worker that is done sends DONE; S returns x when every worker has.

Where this differs from the paper as we read it: AsyLPG is built on asynchronous SVRG (a
full-gradient snapshot each epoch) and Sparse-AsyLPG drops coordinates at random, unbiased;
here the inner step is plain asynchronous SGD and sparsity is top-k with error feedback. Quantizer grids are per block of ``block_size`` values with a
max-abs scale (the paper's per-vector ∞-norm grid is block_size = d).

Several servers (``num_servers`` = n > 1): ranks 0 .. n-1 each run the server steps above on
one contiguous shard of x (own version t, own τ), and a worker runs the worker steps on every
shard at once, its gradient cut at the shard bounds; at step 5 the servers exchange their shards.

Failure: every wait has a deadline. A worker that dies fails the group on every rank, as any
lost peer does: the server and the other workers raise ``PeerLostError`` (or
``GroupAbortedError`` relayed from the rank that saw it first), never hang; a stalled peer
raises ``CollectiveTimeoutError``. Restart the job from a checkpoint of the server's params.
"""

from .config import FULL_PRECISION, AsyLPGConfig
from .server import ParameterServer, ServerStats, serve
from .worker import ShardClient, Worker, WorkerStats

__all__ = ["FULL_PRECISION", "AsyLPGConfig", "ParameterServer", "ServerStats", "ShardClient", "Worker",
           "WorkerStats", "serve"]
