"""How many threads the compression kernels of one rank may use when ranks share a host.

Numba's parallel kernels start a thread per core in every process; four ranks on one host then
run four times as many busy threads as there are cores, and a kernel that takes 2 ms alone took
60 ms. torchrun answers this for torch with ``OMP_NUM_THREADS=1``; sparsecoll does the same for
its kernels: each rank gets its share of the cores, counted from the ranks that published the
same host address.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def ranks_on_my_host(addresses: Sequence[str], rank: int) -> int:
    """Ranks whose published ``host:port`` has this rank's host (this rank included)."""
    hosts = [address.rpartition(":")[0] for address in addresses]
    return hosts.count(hosts[rank])


def share_cores(addresses: Sequence[str], rank: int, kernel_threads: int | None = None) -> int | None:
    """Cap this process's kernel threads: ``kernel_threads`` if given, else ``OMP_NUM_THREADS``
    if set, else the cores divided among the ranks on this host (no cap for a rank alone).

    Before Numba is imported the cap goes into ``NUMBA_NUM_THREADS`` (read at import, so a
    dense-only job never imports Numba); afterwards it is set on the calling thread, the event
    loop's, which is where the collectives run their kernels. Returns the cap, or None.
    """
    if kernel_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        kernel_threads = int(os.environ["OMP_NUM_THREADS"])
    if kernel_threads is None:
        local = ranks_on_my_host(addresses, rank)
        if local <= 1:
            return None
        kernel_threads = (os.cpu_count() or 1) // local
    kernel_threads = max(1, int(kernel_threads))
    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(min(kernel_threads, os.cpu_count() or 1))
        return kernel_threads
    import numba

    numba.set_num_threads(max(1, min(kernel_threads, numba.config.NUMBA_NUM_THREADS)))
    return kernel_threads
