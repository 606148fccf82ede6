"""Huffman-only deflate blocks of byte planes: :func:`deflate_block`.

A deflate stream (RFC 1951) may code every byte as a literal, with no LZ77
match at all, in one block whose Huffman code is built for the bytes it
holds (a "dynamic" block). For a byte plane with few distinct values and no
long repeats, such as the exponent byte of noisy float32 frames (1-3 bits of
entropy a byte), this is smaller than what ISA-L's or zlib's fast levels make
of it, and several times faster: no match search, one table look-up a byte
(the ``ccdgrid._ext._huffman`` kernels). Any inflater reads it; zlib's own
``Z_HUFFMAN_ONLY`` strategy writes the same kind of block, ~11x slower.

Here: the code lengths (minimum redundancy, at most 15 bits, as deflate
allows), the canonical codes, the block header, and the estimate of a
block's size that lets a caller choose between this and a full deflate.
"""

import numpy as np

from ._ext import _huffman

__all__ = [
    "HEADER_BITS",
    "block_bits",
    "code_lengths",
    "deflate_block",
    "histogram",
    "literal_lengths",
]

MAX_BITS = 15  # longest literal code deflate allows
EOB = 256  # end-of-block symbol
# order in which the header sends the code-length code's lengths (RFC 1951, 3.2.7)
_CLEN_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
# The header sends the 257 literal/EOB lengths and two distance lengths with a
# code-length code in which lengths 0-15 all have 4 bits (a complete code;
# the repeat codes 16-18 are unused): 1110 bits in all (139 bytes, 0.02 % of
# a 2048² exponent plane's block), for a header that needs no code of its own.
_CLEN_BITS = 4
# Two distance codes of one bit, never used: some inflaters refuse a block
# with no distance code, and zlib writes at least two.
_DISTANCE_LENGTHS = (1, 1)


def histogram(plane):
    """How often each byte value occurs in ``plane`` (uint8, any shape): int64 (256,)."""
    return _huffman.histogram(_bytes(plane))


def _bytes(plane):
    plane = np.asarray(plane)
    if plane.dtype != np.uint8:
        raise TypeError(f"expected a plane of uint8 bytes, got {plane.dtype}")
    return np.ascontiguousarray(plane).reshape(-1)


def code_lengths(counts, limit=MAX_BITS):
    """Code lengths (uint8) for symbols seen ``counts`` times, none above ``limit`` bits.

    Huffman's, or, when a code would exceed ``limit``, Huffman's for the
    counts halved until none does; 0 for a symbol never seen
    (``ccdgrid._ext._huffman.code_lengths`` says more).
    """
    counts = np.ascontiguousarray(counts, dtype=np.int64).reshape(-1)
    return _huffman.code_lengths(counts, int(limit))


# each length 0-15 as its 4-bit code-length code (canonical code L for length L), reversed
_CLEN_CODES = np.array([int(f"{v:04b}"[::-1], 2) for v in range(16)], dtype=np.uint8)
_PREFIX_BITS = 3 + 5 + 5 + 4 + 3 * len(_CLEN_ORDER)
#: Bits of every block's header (the same whatever the code).
HEADER_BITS = _PREFIX_BITS + _CLEN_BITS * (257 + len(_DISTANCE_LENGTHS))


def _header(lengths, final):
    """The block header for literal/EOB ``lengths`` (257): ``(uint8 array, bits)``."""
    fields = [
        (int(bool(final)), 1),
        (2, 2),  # BTYPE 10: dynamic Huffman codes
        (0, 5),  # HLIT: 257 literal/length codes
        (len(_DISTANCE_LENGTHS) - 1, 5),  # HDIST
        (len(_CLEN_ORDER) - 4, 4),  # HCLEN
    ]
    fields += [(_CLEN_BITS if symbol <= MAX_BITS else 0, 3) for symbol in _CLEN_ORDER]
    prefix, pos = 0, 0
    for value, bits in fields:
        prefix |= value << pos
        pos += bits
    # then every length as its 4-bit code: two to a byte, lower one first
    nibbles = _CLEN_CODES[np.concatenate([lengths, _DISTANCE_LENGTHS]).astype(np.intp)]
    nibbles = np.append(nibbles, np.uint8(0)) if nibbles.size % 2 else nibbles
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    acc = prefix | (int.from_bytes(packed.tobytes(), "little") << pos)
    pos += _CLEN_BITS * (lengths.size + len(_DISTANCE_LENGTHS))
    head = np.frombuffer(acc.to_bytes((pos + 7) // 8, "little"), dtype=np.uint8)
    return head, pos


def block_bits(counts, lengths):
    """Bits of the block :func:`deflate_block` writes for a plane of byte ``counts`` (256),
    with literal/EOB ``lengths`` (257), end of block included, padding excluded."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    return HEADER_BITS + int(counts @ lengths[:256]) + int(lengths[EOB])


def literal_lengths(counts):
    """Code lengths (257: the 256 byte values, then end of block) for a plane's byte ``counts``."""
    return code_lengths(np.append(np.asarray(counts, dtype=np.int64), 1))


def deflate_block(plane, final, *, lengths=None, out=None):
    """``plane`` (uint8, 1-D, any stride) as one Huffman-only deflate block.

    Parameters
    ----------
    plane : ndarray of uint8
        The bytes.
    final : bool
        The last block of the stream (it then ends padded to a byte); else
        an empty stored block follows it, as zlib's sync flush writes, so
        that more deflate data can be appended on a byte boundary.
    lengths : ndarray of uint8, shape (257,), optional
        The code (lengths of the byte values, then of the end of block), for
        instance :func:`literal_lengths` of a sample's counts; every value
        in ``plane`` must have a code. By default, the best code for
        ``plane`` (:func:`literal_lengths` of its :func:`histogram`).
    out : ndarray of uint8, optional
        Buffer to write into, used when large enough.

    Returns
    -------
    ndarray of uint8
        The block (a view of ``out`` when it was large enough).
    """
    plane = _bytes(plane)
    if lengths is None:
        lengths = literal_lengths(histogram(plane))
    else:
        lengths = np.asarray(lengths)
        if lengths.shape != (257,) or lengths.min() < 0 or lengths.max() > MAX_BITS:
            raise ValueError("`lengths` must be 257 code lengths of 0 to 15 bits")
        if not lengths[:256].all() and (histogram(plane)[lengths[:256] == 0] > 0).any():
            # a byte without a code would be sent as nothing: the block would
            # inflate, short of it
            raise ValueError("`lengths` has no code for a byte value of `plane`")
    lengths = np.ascontiguousarray(lengths, dtype=np.uint8)
    head, head_bits = _header(lengths, final)
    need = _huffman.encoded_bound(plane.size, head_bits)
    if out is None or out.size < need:
        out = np.empty(need, dtype=np.uint8)
    size = _huffman.encode_block(plane, head, head_bits, lengths, final, out)
    return out[:size]
