"""Huffman-only deflate blocks: kernels against their numpy twin, zlib as the decoder."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ccdgrid import _huffman
from ccdgrid._ext import _huffman as kernel
from ccdgrid._reference import huffman as twin

ENGINES = {"cython": kernel, "numpy": twin}


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    return ENGINES[request.param]


def _planes():
    rng = np.random.default_rng(3)
    return {
        "empty": np.zeros(0, np.uint8),
        "one": np.array([200], np.uint8),
        "two": np.array([1, 2], np.uint8),
        "constant": np.full(1001, 7, np.uint8),
        "uniform": rng.integers(0, 256, 5000).astype(np.uint8),
        # the exponent byte of noisy float32 counts: a few values, ~1.2 bits each
        "exponent": rng.choice(
            np.array([0x42, 0x43, 0x44, 0x45], np.uint8), 70001, p=[0.1, 0.5, 0.3, 0.1]
        ),
        # a long tail: codes that would exceed 15 bits without the limit
        "skewed": np.minimum(rng.geometric(0.6, 200_000), 255).astype(np.uint8),
    }


PLANES = _planes()


def _inflate(block):
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = inflater.decompress(bytes(block))
    return data, inflater.eof


# -- histogram -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLANES))
def test_histogram_counts_every_byte_as_bincount(name):
    plane = PLANES[name]
    counts = kernel.histogram(plane)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, twin.histogram(plane))
    assert counts.sum() == plane.size


def test_histogram_facade_takes_strided_and_2d_planes_only_as_bytes():
    frame = np.random.default_rng(4).uniform(100, 4000, (37, 41)).astype(np.float32)
    exponent = frame.view(np.uint8)[:, 3::4]  # not contiguous
    np.testing.assert_array_equal(
        _huffman.histogram(exponent), np.bincount(exponent.ravel(), minlength=256)
    )
    with pytest.raises(TypeError, match="uint8"):
        _huffman.histogram(frame)


# -- code lengths ------------------------------------------------------------------------


def _kraft(lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    return float(np.sum(2.0 ** -lengths[lengths > 0]))


@pytest.mark.parametrize("name", sorted(PLANES))
def test_code_lengths_are_the_twins_and_a_complete_code(engine, name):
    counts = np.append(twin.histogram(PLANES[name]), 1)  # with the end of block
    lengths = engine.code_lengths(counts, 15)
    np.testing.assert_array_equal(lengths, twin.code_lengths(counts, 15))
    assert lengths.dtype == np.uint8
    assert ((lengths > 0) == (counts > 0)).all()
    assert lengths.max() <= 15
    # complete (none wasted) with two symbols or more; one symbol: one 1-bit code
    assert _kraft(lengths) == (1.0 if (counts > 0).sum() >= 2 else 0.5)


def test_code_lengths_are_minimum_redundancy_when_the_limit_allows():
    # counts 1, 1, 2, 4, 8: Huffman gives 4, 4, 3, 2, 1 bits
    counts = np.array([8, 0, 1, 4, 1, 2], dtype=np.int64)
    np.testing.assert_array_equal(kernel.code_lengths(counts, 15), [1, 0, 4, 2, 4, 3])


def test_code_lengths_respect_a_limit_that_bites(engine):
    # Fibonacci counts make a Huffman tree as deep as there are symbols
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib[::-1], dtype=np.int64)
    assert twin.code_lengths(counts, 30).max() == 24  # unlimited: 24 bits deep
    for limit in (15, 7, 5):
        lengths = engine.code_lengths(counts, limit)
        assert lengths.max() <= limit
        assert _kraft(lengths) <= 1.0
        np.testing.assert_array_equal(lengths, twin.code_lengths(counts, limit))


@pytest.mark.parametrize(
    ("counts", "expected"),
    [([0, 0, 0], [0, 0, 0]), ([0, 5, 0], [0, 1, 0]), ([], [])],
    ids=["none-seen", "one-seen", "no-symbols"],
)
def test_code_lengths_of_fewer_than_two_symbols(engine, counts, expected):
    lengths = engine.code_lengths(np.array(counts, dtype=np.int64), 15)
    np.testing.assert_array_equal(lengths, expected)


@pytest.mark.parametrize(
    ("counts", "limit", "match"),
    [([1, -1], 15, "non-negative"), ([1] * 9, 3, "2\\*\\*limit"), ([1, 1], 0, "limit")],
)
def test_code_lengths_refuse_impossible_requests(engine, counts, limit, match):
    with pytest.raises(ValueError, match=match):
        engine.code_lengths(np.array(counts, dtype=np.int64), limit)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 10**9)),
    st.integers(0, 6),
    st.booleans(),
)
def test_code_lengths_agree_with_the_twin_on_any_counts(counts, slack, skewed):
    # a limit from the tightest possible up: the halving path runs too
    if skewed:  # a long tail: Huffman's tree is deep
        counts = counts % 7 * 2 ** (np.arange(counts.size) % 40)
    limit = min(15, max(1, int(np.ceil(np.log2(max(counts.size, 2))))) + slack)
    lengths = kernel.code_lengths(counts, limit)
    np.testing.assert_array_equal(lengths, twin.code_lengths(counts, limit))
    assert lengths.max(initial=0) <= limit
    if (counts > 0).sum() >= 2:
        assert _kraft(lengths) == 1.0


# -- blocks --------------------------------------------------------------------------------


def _block_inputs(plane, final):
    lengths = _huffman.literal_lengths(twin.histogram(plane))
    head, head_bits = _huffman._header(lengths, final)
    out = np.full(kernel.encoded_bound(plane.size, head_bits), 0xAA, dtype=np.uint8)
    return head, head_bits, lengths, out


@pytest.mark.parametrize("final", [True, False], ids=["final", "sync"])
@pytest.mark.parametrize("name", sorted(PLANES))
def test_block_is_the_twins_and_inflates_to_the_plane(engine, name, final):
    plane = PLANES[name]
    head, head_bits, lengths, out = _block_inputs(plane, final)
    size = engine.encode_block(plane, head, head_bits, lengths, final, out)
    expected = np.full_like(out, 0xAA)
    assert twin.encode_block(plane, head, head_bits, lengths, final, expected) == size
    np.testing.assert_array_equal(out[:size], expected[:size])
    data, ended = _inflate(out[:size])
    assert data == plane.tobytes()
    assert ended == final
    # the size is what block_bits says, padded to the byte (+4 for the sync block)
    bits = _huffman.block_bits(twin.histogram(plane), lengths)
    assert size == (bits + (0 if final else 3) + 7) // 8 + (0 if final else 4)


def test_blocks_concatenate_with_deflate_pieces():
    rng = np.random.default_rng(5)
    first = PLANES["exponent"]
    second = rng.integers(0, 256, 3000).astype(np.uint8)
    third = PLANES["skewed"][:5000]
    deflate = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = (
        _huffman.deflate_block(first, final=False).tobytes()
        + deflate.compress(second.tobytes())
        + deflate.flush(zlib.Z_SYNC_FLUSH)
        + _huffman.deflate_block(third, final=True).tobytes()
    )
    data, ended = _inflate(stream)
    assert ended
    assert data == first.tobytes() + second.tobytes() + third.tobytes()


def test_a_code_from_a_sample_codes_values_the_sample_missed():
    # as the stack writer does: counts of a sample, every value counted once more
    plane = PLANES["exponent"].copy()
    sample = plane[:1000]
    plane[[5000, 60000]] = [0, 255]  # not in the sample
    lengths = _huffman.literal_lengths(np.bincount(sample, minlength=256) + 1)
    block = _huffman.deflate_block(plane, final=True, lengths=lengths)
    assert _inflate(block) == (plane.tobytes(), True)
    # a code built from the plane itself is no larger
    assert _huffman.deflate_block(plane, final=True).size <= block.size


def test_deflate_block_is_smaller_than_fast_deflate_on_an_exponent_plane():
    plane = PLANES["exponent"]
    block = _huffman.deflate_block(plane, final=True)
    entropy = -(np.bincount(plane) / plane.size)
    entropy = float((entropy[entropy < 0] * np.log2(-entropy[entropy < 0])).sum())
    # Huffman: within 1 bit a byte of the entropy (1.69 bits here); zlib level 1 larger
    assert entropy * plane.size / 8 < block.size < (entropy + 1) * plane.size / 8
    assert block.size < len(zlib.compress(plane.tobytes(), 1))


def test_deflate_block_reuses_a_large_enough_buffer_and_reads_strided_planes():
    frame = np.random.default_rng(6).uniform(100, 4000, (64, 50)).astype(np.float32)
    exponent = frame.view(np.uint8)[:, 3::4]
    buffer = np.empty(100_000, dtype=np.uint8)
    block = _huffman.deflate_block(exponent, final=True, out=buffer)
    assert np.shares_memory(block, buffer)
    assert _inflate(block) == (np.ascontiguousarray(exponent).tobytes(), True)
    small = np.empty(10, dtype=np.uint8)
    assert not np.shares_memory(_huffman.deflate_block(exponent, True, out=small), small)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda lens: np.where(lens == lens.max(), 16, lens), "15|lengths"),  # 16 bits
        (lambda lens: np.ones_like(lens), "no deflate code"),  # 257 one-bit codes
        (lambda lens: lens[:-1], "257"),
        (lambda lens: np.full_like(lens, 9), "no deflate code"),  # incomplete: zlib refuses
        (lambda lens: np.append(lens[:-1], 0), "no deflate code"),  # no end of block
    ],
    ids=["too-long", "over-full", "short", "incomplete", "no-end-of-block"],
)
def test_encode_block_refuses_lengths_that_are_no_code(engine, change, match):
    plane = PLANES["exponent"][:100]
    head, head_bits, lengths, out = _block_inputs(plane, True)
    bad = np.ascontiguousarray(change(lengths.astype(np.int64)), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        engine.encode_block(plane, head, head_bits, bad, True, out)


def test_encode_block_refuses_a_small_buffer_and_bad_header_bits(engine):
    plane = PLANES["uniform"]
    head, head_bits, lengths, out = _block_inputs(plane, True)
    with pytest.raises(ValueError, match="too small"):
        engine.encode_block(plane, head, head_bits, lengths, True, out[:-1])
    for bits in (-8, 8 * head.size + 1):  # -8 made the kernel memcpy (size_t)-1 bytes
        with pytest.raises(ValueError, match="head_bits"):
            engine.encode_block(plane, head, bits, lengths, True, out)


def test_deflate_block_refuses_a_code_without_a_byte_of_the_plane():
    # a byte of length 0 would be sent as nothing: a valid block, one byte short
    plane = np.array([1, 2, 3, 3, 3, 200], dtype=np.uint8)
    lengths = _huffman.literal_lengths(np.bincount(plane[:5], minlength=256))
    with pytest.raises(ValueError, match="no code for a byte value"):
        _huffman.deflate_block(plane, True, lengths=lengths)
    with pytest.raises(ValueError, match="0 to 15 bits"):
        _huffman.deflate_block(plane, True, lengths=np.full(257, 256))
    # the same code serves a plane of the bytes it has
    block = _huffman.deflate_block(plane[:5], True, lengths=lengths)
    assert _inflate(block) == (plane[:5].tobytes(), True)
