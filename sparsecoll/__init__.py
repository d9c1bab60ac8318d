"""sparsecoll: sparse and compressed collectives for distributed SGD over TCP and UCX.

The asyncio API::

    async with await sparsecoll.init_group() as group:    # env:// as torchrun sets it
        total, stats = await group.allreduce(array)

and the same calls, blocking, for plain training code: ``sparsecoll.init_sync_group()``.
"""

from sparsecoll import errors
from sparsecoll.call import Call, CollectiveResult, CommStats
from sparsecoll.group import DEFAULT_TIMEOUT, Group, init_group
from sparsecoll.sync import SyncGroup, init_sync_group

__version__ = "0.1.0"

__all__ = [
    "Call",
    "CollectiveResult",
    "CommStats",
    "DEFAULT_TIMEOUT",
    "Group",
    "SyncGroup",
    "errors",
    "init_group",
    "init_sync_group",
]
