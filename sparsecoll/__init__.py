"""sparsecoll: sparse and compressed collectives for distributed SGD over TCP and UCX.

The asyncio API::

    async with await sparsecoll.init_group() as group:    # env:// as torchrun sets it
        total, stats = await group.allreduce(array)

and the same calls, blocking, for plain training code: ``sparsecoll.init_sync_group()``.
"""

from sparsecoll import errors
from sparsecoll.call import Call, CollectiveResult, CommStats
from sparsecoll.group import DEFAULT_TIMEOUT, Group, init_group
from sparsecoll.p2p import Message, wait_all
from sparsecoll.registry import register_collective, register_compressor
from sparsecoll.sync import SyncGroup, init_sync_group
from sparsecoll.transport.mailbox import ANY_SOURCE

__version__ = "0.1.0"

__all__ = [
    "ANY_SOURCE",
    "Call",
    "CollectiveResult",
    "CommStats",
    "DEFAULT_TIMEOUT",
    "Group",
    "Message",
    "SyncGroup",
    "errors",
    "init_group",
    "init_sync_group",
    "register_collective",
    "register_compressor",
    "wait_all",
]
