"""PyTorch integration: a wrapping optimizer and a DDP communication hook over sparsecoll.

Nothing outside this package imports torch for training. Typical use, under
``torchrun --nproc-per-node N train.py``::

    group = sparsecoll.torch.init_group()
    opt = SparseCollOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), group,
                              algorithm="gtopk", density=0.001)
"""

from __future__ import annotations

from typing import Any

from sparsecoll.sync import SyncGroup, init_sync_group
from sparsecoll.torch.buckets import DEFAULT_BUCKET_BYTES, small_parameters
from sparsecoll.torch.ddp_hook import CommHookState, comm_hook
from sparsecoll.torch.density import Accordion, DensitySchedule
from sparsecoll.torch.error_feedback import ErrorFeedback, warmup_density
from sparsecoll.torch.optimizer import SparseCollOptimizer
from sparsecoll.torch.replicas import BufferBroadcast, broadcast_tensors

__all__ = ["Accordion", "BufferBroadcast", "CommHookState", "DEFAULT_BUCKET_BYTES", "DensitySchedule",
           "ErrorFeedback", "SparseCollOptimizer",
           "broadcast_tensors", "comm_hook", "init_group", "small_parameters", "warmup_density"]


def init_group(**kwargs: Any) -> SyncGroup:
    """A blocking sparsecoll group for torch code (arguments as :func:`sparsecoll.init_group`).

    With no arguments it joins the job torchrun started (``env://``), beside torch's own
    process group if there is one; close it with ``group.close()`` at the end. The
    compression kernels' threads are capped as :func:`sparsecoll.init_group` does: at
    ``kernel_threads``, else ``OMP_NUM_THREADS`` (torchrun sets 1 for several ranks a host),
    else the host's cores shared among its ranks.
    """
    return init_sync_group(**kwargs)
