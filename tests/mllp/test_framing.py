"""MLLP framer: splits, junk, truncation, oversize, garbage."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.mllp.framing import (
    CR,
    END,
    START,
    FrameTooLarge,
    FramingError,
    MLLPDecoder,
    encode,
)

ADT = b"MSH|^~\\&|APP|FAC|REC|RFAC|20240101120000||ADT^A01|MSG1|P|2.5\rPID|1||123^^^FAC^MR\r"

# Payload bytes may be anything except the two framing bytes.
payloads = st.binary(max_size=300).map(lambda b: b.replace(START, b"").replace(END, b""))


def feed_all(decoder: MLLPDecoder, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += decoder.feed(chunk)
    return frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


def test_encode():
    assert encode(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    assert (START, END, CR) == (b"\x0b", b"\x1c", b"\r")


def test_one_frame():
    d = MLLPDecoder()
    assert d.feed(encode(ADT)) == [ADT]
    assert d.buffered == 0 and d.discarded == 0 and not d.in_frame


@given(st.lists(payloads, max_size=6), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_split_yields_the_same_frames(frames, cuts):
    stream = b"".join(encode(p) for p in frames)
    d = MLLPDecoder()
    assert feed_all(d, split_at(stream, cuts)) == frames
    assert d.discarded == 0
    assert d.buffered == 0


def test_every_byte_boundary_and_byte_by_byte():
    stream = encode(ADT) + encode(b"second") + encode(b"")
    expected = [ADT, b"second", b""]
    for cut in range(len(stream) + 1):
        assert feed_all(MLLPDecoder(), [stream[:cut], stream[cut:]]) == expected
    assert feed_all(MLLPDecoder(), [bytes([b]) for b in stream]) == expected


@given(
    st.lists(st.tuples(st.binary(max_size=20), payloads, st.booleans()), max_size=5),
    st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_lenient_stream_any_split(parts, cuts):
    """Junk between frames and END without CR: same frames and count whatever the split."""
    stream = b""
    for junk, payload, with_cr in parts:
        junk = junk.replace(START, b"")
        if stream.endswith(END) and junk.startswith(CR):
            junk = junk[1:]  # that CR would be taken as the frame's own
        stream += junk + START + payload + END + (CR if with_cr else b"")
    whole = MLLPDecoder()
    expected = whole.feed(stream)
    assert expected == [p for _, p, _ in parts]
    split = MLLPDecoder()
    assert feed_all(split, split_at(stream, cuts)) == expected
    assert split.discarded == whole.discarded


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=10), st.integers(min_value=1, max_value=300))
def test_garbage_raises_only_framing_errors(chunks, limit):
    d = MLLPDecoder(max_frame_bytes=limit)
    try:
        for chunk in chunks:
            for frame in d.feed(chunk):
                assert START not in frame and END not in frame
                assert len(frame) <= limit
            assert d.buffered <= limit
    except FramingError:
        pass


def test_junk_before_start_block_is_skipped_and_counted():
    d = MLLPDecoder()
    assert d.feed(b"\r\nGET / HTTP/1.0\r\n") == []
    assert d.buffered == 0  # junk outside a frame is not kept
    assert d.feed(b"xx" + encode(b"A")) == [b"A"]
    assert d.discarded == 18 + 2


def test_line_endings_inside_payload_kept():
    payload = b"MSH|^~\\&|A\r\nPID|1\nPV1|1\r"
    assert MLLPDecoder().feed(encode(payload)) == [payload]


def test_bom_inside_payload_kept():
    payload = b"\xef\xbb\xbfMSH|^~\\&|A"
    assert MLLPDecoder().feed(encode(payload)) == [payload]


def test_end_without_cr():
    d = MLLPDecoder()
    assert d.feed(START + b"one" + END + START + b"two" + END + b"junk") == [b"one", b"two"]
    assert d.discarded == 4


def test_cr_after_end_in_next_read_is_swallowed():
    d = MLLPDecoder()
    assert d.feed(START + b"one" + END) == [b"one"]
    assert d.feed(b"") == []
    assert d.feed(CR + START + b"two" + END + CR) == [b"two"]
    assert d.discarded == 0


def test_only_one_cr_is_swallowed():
    d = MLLPDecoder()
    d.feed(START + b"one" + END)
    d.feed(CR + CR)
    assert d.discarded == 1


def test_start_inside_frame_drops_the_truncated_frame():
    d = MLLPDecoder()
    assert d.feed(START + b"cut off" + START + b"whole" + END + CR) == [b"whole"]
    assert d.discarded == len(b"cut off")


def test_start_inside_frame_across_reads():
    d = MLLPDecoder()
    assert d.feed(START + b"cut") == []
    assert d.buffered == 3
    assert d.feed(b" off" + START + b"who") == []
    assert d.feed(b"le" + END + CR) == [b"whole"]
    assert d.discarded == len(b"cut off")


def test_many_frames_in_one_feed():
    frames = [b"MSH|%d" % i for i in range(500)]
    assert MLLPDecoder().feed(b"".join(encode(f) for f in frames)) == frames


def test_oversize_raises_with_prefix_and_bounded_memory():
    limit, chunk = 1000, 64
    d = MLLPDecoder(max_frame_bytes=limit)
    body = ADT + b"OBX|" + b"x" * 5000
    data = START + body
    with pytest.raises(FrameTooLarge) as info:
        for i in range(0, len(data), chunk):
            d.feed(data[i : i + chunk])
            assert d.buffered <= limit + chunk
    assert info.value.limit == limit
    assert info.value.prefix == body[: len(info.value.prefix)]
    assert info.value.prefix.startswith(ADT)  # enough to read MSH for the NAK
    assert d.buffered == 0
    with pytest.raises(FramingError):
        d.feed(encode(b"after"))


def test_oversize_in_one_read_keeps_at_most_64k_prefix():
    d = MLLPDecoder(max_frame_bytes=100_000)
    with pytest.raises(FrameTooLarge) as info:
        d.feed(START + b"MSH" + b"x" * 200_000)
    assert len(info.value.prefix) == 64 * 1024
    assert info.value.prefix.startswith(b"MSH")


def test_oversize_with_end_in_the_same_read_still_raises():
    d = MLLPDecoder(max_frame_bytes=10)
    with pytest.raises(FrameTooLarge) as info:
        d.feed(encode(b"ok") + encode(b"x" * 11))
    assert info.value.frames == [b"ok"]  # frames completed before it are not lost


def test_frame_of_exactly_the_limit_is_accepted():
    d = MLLPDecoder(max_frame_bytes=10)
    assert d.feed(START + b"x" * 10) == []
    assert d.buffered == 10
    assert d.feed(END + CR) == [b"x" * 10]


@given(st.integers(min_value=1, max_value=50), st.integers(min_value=1, max_value=40))
def test_oversize_memory_bound_property(limit, chunk):
    d = MLLPDecoder(max_frame_bytes=limit)
    data = START + b"y" * (limit * 3)
    with pytest.raises(FrameTooLarge):
        for i in range(0, len(data), chunk):
            d.feed(data[i : i + chunk])
            assert d.buffered <= limit


def test_large_frame_in_small_reads_is_linear():
    """200 KB in 1 KB reads, then 16 MB in 1 KB reads.

    Rescanning the buffer on every read would search ~128 GB for the 16 MB
    frame (many seconds); a linear decoder takes well under 0.1 s.
    """
    for size in (200 * 1024, 16 * 1024 * 1024):
        payload = b"OBX|1|ED|||^application^pdf^Base64^" + b"A" * size
        stream = encode(payload)
        d = MLLPDecoder(max_frame_bytes=32 * 1024 * 1024)
        started = time.perf_counter()
        frames = feed_all(d, [stream[i : i + 1024] for i in range(0, len(stream), 1024)])
        assert time.perf_counter() - started < 1.0
        assert frames == [payload]


def test_invalid_limit():
    with pytest.raises(ValueError):
        MLLPDecoder(max_frame_bytes=0)
