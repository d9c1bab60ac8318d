"""Numba's on-disk cache, made stale by any change to the kernel sources.

Numba stamps a cached kernel with the hash of the one file that defines it. A kernel that
calls a helper from another file (``_scalar.stochastic_code`` inside ``quantize.py``'s loops)
has that helper compiled into its own machine code, so editing only the helper left the old
code in the cache: a kernel edit could pass its tests against a warm cache. Here the stamp
of every kernel in this directory is one hash over all of this directory's sources, so any
edit recompiles them all (a few seconds, once). Kernels elsewhere keep Numba's own rule.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from numba.core import config
from numba.core.caching import CacheImpl, _CacheLocator, _SourceFileBackedLocatorMixin

KERNELS_DIRECTORY = Path(__file__).resolve().parent


def sources_digest(directory: Path = KERNELS_DIRECTORY) -> bytes:
    """SHA-256 over the names and contents of every ``.py`` file in ``directory``."""
    paths = sorted(directory.glob("*.py"))
    return _digest(tuple(paths), tuple((path.stat().st_mtime_ns, path.stat().st_size) for path in paths))


@functools.lru_cache(maxsize=8)
def _digest(paths: tuple[Path, ...], stamps: tuple) -> bytes:
    # ``stamps`` (mtimes and sizes) is part of the key: an edit in a running process re-hashes
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


class KernelSourcesLocator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """Caches a kernel of this directory where Numba would, stamped with :func:`sources_digest`."""

    def __init__(self, py_func, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        if config.CACHE_DIR:  # NUMBA_CACHE_DIR wins, as with Numba's own locators
            self._cache_path = os.path.join(config.CACHE_DIR, self.get_suitable_cache_subpath(py_file))
        else:
            self._cache_path = os.path.join(os.path.dirname(py_file), "__pycache__")

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self) -> bytes:
        return sources_digest(Path(self._py_file).resolve().parent)

    @classmethod
    def from_function(cls, py_func, py_file: str):
        if Path(py_file).resolve().parent != KERNELS_DIRECTORY:
            return None
        return super().from_function(py_func, py_file)


def install() -> None:
    """Put the locator first in Numba's list (once), before any kernel here is decorated."""
    if not any(getattr(locator, "__qualname__", "") == KernelSourcesLocator.__qualname__
               and getattr(locator, "__module__", "") == __name__ for locator in CacheImpl._locator_classes):
        CacheImpl._locator_classes.insert(0, KernelSourcesLocator)
