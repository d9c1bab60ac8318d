"""Every exception sparsecoll raises, in one hierarchy named by cause.

Each error carries the ``rank`` that raised it and, where one is to blame, the ``peer`` rank.
Errors that travel between ranks (in an abort frame) are rebuilt from a numeric code, never
from serialized objects.
"""

from __future__ import annotations


class SparseCollError(Exception):
    """Root of every sparsecoll error."""

    code = 1
    origin: int | None = None
    """The rank that reported this error in an abort frame (None: seen on this rank)."""

    def __init__(self, message: str, *, rank: int | None = None, peer: int | None = None) -> None:
        self.message = message
        self.rank = rank
        self.peer = peer
        where = []
        if rank is not None:
            where.append(f"rank {rank}")
        if peer is not None:
            where.append(f"peer {peer}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)

    def __reduce__(self):  # keeps errors picklable for multiprocessing result queues (not the wire)
        return (_rebuild, (type(self), self.message, self.rank, self.peer))


def _rebuild(cls: type[SparseCollError], message: str, rank: int | None, peer: int | None):
    return cls(message, rank=rank, peer=peer)


class InvalidArgumentError(SparseCollError, ValueError):
    """A caller passed an argument the collective cannot use (bad dtype, shape, root...)."""

    code = 2


class PeerLostError(SparseCollError):
    """A peer closed its connection, reset it, or was reported dead by another rank."""

    code = 3


class CollectiveTimeoutError(SparseCollError, TimeoutError):
    """A network wait passed its deadline."""

    code = 4


class AuthenticationError(SparseCollError):
    """A connection failed the HMAC challenge-response (wrong or missing secret)."""

    code = 5


class FrameError(SparseCollError):
    """A frame is malformed: bad magic, version, kind, dtype, or truncated."""

    code = 6


class FrameTooLargeError(FrameError):
    """A frame's length field exceeds the group's limit or what the collective can need."""

    code = 7


class CollectiveMismatchError(SparseCollError):
    """Ranks called different collectives, or the same one with different arguments."""

    code = 8


class RendezvousError(SparseCollError):
    """Peers could not be found or connected through the store."""

    code = 9


class GroupClosedError(SparseCollError):
    """The group was closed and cannot be used again."""

    code = 10


class GroupAbortedError(SparseCollError):
    """A rank called ``Group.abort()``; every other rank sees this error."""

    code = 11


class LoopThreadError(SparseCollError, RuntimeError):
    """A blocking :class:`~sparsecoll.SyncGroup` call was made on the group's own event-loop
    thread (from a coroutine, a callback or a codec running there): it would wait for the
    loop it blocks. Await the :class:`~sparsecoll.Group` call instead."""

    code = 12


class NonFiniteGradientError(SparseCollError, ArithmeticError):
    """A rank's gradient held NaN or inf and the step was not to be skipped; raised on every rank."""

    code = 13


class PerBucketDensityWarning(UserWarning):
    """A warning, not an error: DDP split the gradient into several buckets and the comm hook
    compresses each on its own, a top-k per bucket at the density rather than one over the
    model, which can cost accuracy at low density (see :class:`sparsecoll.torch.CommHookState`)."""


ERRORS_BY_CODE: dict[int, type[SparseCollError]] = {
    cls.code: cls
    for cls in (
        SparseCollError,
        InvalidArgumentError,
        PeerLostError,
        CollectiveTimeoutError,
        AuthenticationError,
        FrameError,
        FrameTooLargeError,
        CollectiveMismatchError,
        RendezvousError,
        GroupClosedError,
        GroupAbortedError,
        LoopThreadError,
        NonFiniteGradientError,
    )
}

__all__ = [cls.__name__ for cls in ERRORS_BY_CODE.values()] + ["ERRORS_BY_CODE", "PerBucketDensityWarning"]
