"""PyTorch integration: a wrapping optimizer and a DDP communication hook over sparsecoll.

Nothing outside this package imports torch for training. Typical use, under
``torchrun --nproc-per-node N train.py``::

    group = sparsecoll.torch.init_group()
    opt = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), group,
                              algorithm="gtopk", density=0.001)
"""

from __future__ import annotations

import os
from typing import Any

from sparsecoll.sync import SyncGroup, init_sync_group
from sparsecoll.torch.buckets import DEFAULT_BUCKET_BYTES, small_parameters
from sparsecoll.torch.ddp_hook import CommHookState, comm_hook
from sparsecoll.torch.error_feedback import ErrorFeedback, warmup_density
from sparsecoll.torch.optimizer import SparseCollOptimizer

__all__ = ["CommHookState", "DEFAULT_BUCKET_BYTES", "ErrorFeedback", "SparseCollOptimizer", "comm_hook",
           "init_group", "small_parameters", "warmup_density"]


def init_group(*, kernel_threads: int | None = None, **kwargs: Any) -> SyncGroup:
    """A blocking sparsecoll group for torch code (other arguments as :func:`sparsecoll.init_group`).

    With no arguments it joins the job torchrun started (``env://``), beside torch's own
    process group if there is one; close it with ``group.close()`` at the end.
    ``kernel_threads`` caps the Numba threads of the compression kernels (they run on the
    group's loop thread); it defaults to ``OMP_NUM_THREADS`` when set, as torchrun sets it
    to 1 for several ranks a host: kernels with a thread per core in every rank oversubscribe
    the host and made sparse steps ten times slower.
    """
    if kernel_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        kernel_threads = int(os.environ["OMP_NUM_THREADS"])
    sync = init_sync_group(**kwargs)
    if kernel_threads:
        sync.run(_cap_kernel_threads(kernel_threads))
    return sync


async def _cap_kernel_threads(count: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
