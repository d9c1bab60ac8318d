"""Frame header, signature and abort codecs; the decoder never fails except with FrameError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecoll.errors import CollectiveTimeoutError, FrameError, FrameTooLargeError, PeerLostError
from sparsecoll.wire import (
    HEADER_SIZE,
    MAGIC,
    Algorithm,
    FrameHeader,
    Kind,
    Op,
    ReduceOp,
    Signature,
    decode_abort,
    decode_frames,
    decode_header,
    dtype_code,
    dtype_from_code,
    encode_abort,
    encode_header,
)

signatures = st.builds(
    Signature,
    op=st.sampled_from(list(Op)), algorithm=st.sampled_from(list(Algorithm)),
    dtype=st.integers(0, 11), reduce_op=st.sampled_from(list(ReduceOp)),
    root=st.integers(-1, 2**31 - 1), count=st.integers(0, 2**64 - 1),
    k=st.integers(0, 2**64 - 1), extra=st.integers(0, 2**64 - 1))
headers = st.builds(
    FrameHeader, kind=st.sampled_from(list(Kind)), context=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1), tag=st.integers(0, 2**32 - 1), length=st.integers(0, 1 << 30),
    signature=signatures, flags=st.integers(0, 2**16 - 1))


@given(headers)
def test_header_round_trips(header: FrameHeader) -> None:
    data = encode_header(header)
    assert len(data) == HEADER_SIZE
    assert decode_header(data) == header


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_decoder_on_arbitrary_bytes_decodes_or_raises_frame_error(data: bytes) -> None:
    try:
        frames = decode_frames(data, max_payload=1 << 16)
    except FrameError:
        return
    assert sum(HEADER_SIZE + len(payload) for _, payload in frames) == len(data)


@settings(max_examples=300)
@given(headers, st.binary(max_size=64), st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_corrupted_valid_frames_never_crash_the_decoder(header, payload, position, byte) -> None:
    header = FrameHeader(header.kind, header.context, header.seq, header.tag, len(payload),
                         header.signature, header.flags)
    data = bytearray(encode_header(header) + payload)
    data[position] = byte
    try:
        frames = decode_frames(bytes(data))
    except FrameError:
        return
    # what decodes must account for every byte: no frame read past, or short of, the data
    assert sum(HEADER_SIZE + len(payload) for _, payload in frames) == len(data)


def test_limits_are_checked_before_the_payload() -> None:
    huge = encode_header(FrameHeader(Kind.DATA, 0, 0, 0, 1 << 40))
    with pytest.raises(FrameTooLargeError):
        decode_header(huge, max_payload=1 << 30)
    with pytest.raises(FrameError, match="magic"):
        decode_header(b"XXXX" + huge[4:])
    with pytest.raises(FrameError, match="version"):
        decode_header(huge[:4] + bytes([99]) + huge[5:])
    with pytest.raises(FrameError, match="kind"):
        decode_header(huge[:5] + bytes([200]) + huge[6:])
    with pytest.raises(FrameError, match="truncated"):
        decode_header(huge[:10])
    with pytest.raises(FrameError, match="truncated payload"):
        decode_frames(encode_header(FrameHeader(Kind.DATA, 0, 0, 0, 10)) + b"abc")
    assert huge.startswith(MAGIC)


def test_dtype_codes_cover_the_gradient_dtypes() -> None:
    for dtype in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.uint32):
        assert dtype_from_code(dtype_code(dtype)) == np.dtype(dtype)
    with pytest.raises(FrameError):
        dtype_code(np.complex64)
    with pytest.raises(FrameError):
        dtype_from_code(99)


def test_abort_payload_rebuilds_the_error_on_the_receiver() -> None:
    payload = encode_abort(3, CollectiveTimeoutError("waited too long", rank=3, peer=1))
    error = decode_abort(payload, receiver_rank=0)
    assert isinstance(error, CollectiveTimeoutError)
    assert (error.rank, error.peer) == (0, 1)
    assert "reported by rank 3" in str(error)
    lost = decode_abort(encode_abort(2, PeerLostError("x" * 5000, rank=2)), receiver_rank=1)
    assert lost.peer is None and len(lost.message) < 600
    with pytest.raises(FrameError):
        decode_abort(struct.pack("<iiB", 0, 1, 250), receiver_rank=0)
    with pytest.raises(FrameError):
        decode_abort(b"\x00", receiver_rank=0)


def test_signature_describes_itself_for_error_messages() -> None:
    text = Signature(Op.ALLREDUCE, Algorithm.RING, dtype_code(np.float32), ReduceOp.SUM, -1, 10).describe()
    assert text == "allreduce(algorithm=ring, dtype=float32, op=sum, count=10)"
