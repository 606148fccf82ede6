"""Pure-Python/numpy twin of ``ccdgrid._ext._huffman`` (Huffman-only deflate blocks).

Same signatures and the same bytes, by other routes: the counts by
``np.bincount``, the code lengths by ``heapq`` on ``(count, node id)``
pairs (leaves numbered first, in symbol order), and the block as an array of
bits, one per element, that ``np.packbits`` packs in deflate's order (least
significant bit first).
"""

import heapq

import numpy as np

__all__ = ["canonical_codes", "code_lengths", "encode_block", "encoded_bound", "histogram"]

MAX_BITS = 15
EOB = 256


def histogram(src):
    return np.bincount(np.asarray(src, dtype=np.uint8), minlength=256).astype(np.int64)


def _depths(weights):
    n = len(weights)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        wa, a = heapq.heappop(heap)
        wb, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (wa + wb, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):
        depth[i] = depth[parent[i]] + 1
    return np.array(depth[:n], dtype=np.int64)


def code_lengths(counts, limit):
    counts = np.asarray(counts, dtype=np.int64)
    if not 1 <= limit <= 30 or counts.size > 2**limit:
        raise ValueError("limit must be 1 to 30, with at most 2**limit symbols")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    lengths = np.zeros(counts.shape, dtype=np.uint8)
    present = np.flatnonzero(counts)
    if present.size == 1:
        lengths[present] = 1
    if present.size < 2:
        return lengths
    weights = counts[present]
    while True:
        depth = _depths(weights)
        if depth.max() <= limit:
            break
        weights = (weights + 1) // 2
    lengths[present] = depth
    return lengths


def canonical_codes(lengths):
    """Deflate's canonical codes (RFC 1951, 3.2.2), most significant bit first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape, dtype=np.int64)
    code = 0
    # symbols by (length, symbol): each code is the previous one + 1, shifted as lengths grow
    previous = 0
    for symbol in np.lexsort((np.arange(lengths.size), lengths)):
        bits = int(lengths[symbol])
        if bits == 0:
            continue
        code <<= bits - previous
        codes[symbol] = code
        code += 1
        previous = bits
    return codes


def encoded_bound(n, head_bits):
    return (head_bits + 15 * (n + 1) + 7) // 8 + 5 + 8


def _bits(values, widths):
    """Bits of ``values`` (int64) sent with ``widths`` bits each, least significant first."""
    widths = np.asarray(widths, dtype=np.int64)
    owner = np.repeat(np.arange(widths.size), widths)
    place = np.arange(owner.size) - np.repeat(np.cumsum(widths) - widths, widths)
    return ((np.asarray(values, dtype=np.int64)[owner] >> place) & 1).astype(np.uint8)


def encode_block(src, head, head_bits, lengths, final, out):
    """The block as :func:`ccdgrid._ext._huffman.encode_block` writes it into ``out``;
    returns the bytes written."""
    src = np.asarray(src, dtype=np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size != 257 or lengths.max(initial=0) > MAX_BITS:
        raise ValueError("lengths must have 257 entries of at most 15 bits")
    kraft = np.sum(2.0 ** -lengths[lengths > 0])
    if not (kraft == 1.0 or (kraft == 0.5 and (lengths == 1).sum() == 1)) or not lengths[EOB]:
        raise ValueError("lengths are no deflate code: not complete, or no end of block")
    if not 0 <= head_bits <= 8 * np.asarray(head).size:
        raise ValueError("head_bits must be 0 to 8 * head.size")
    if out.size < encoded_bound(src.size, head_bits):
        raise ValueError("output buffer too small")
    # a Huffman code is sent from its most significant bit: reverse it
    msb_first = canonical_codes(lengths)
    reversed_codes = np.zeros(257, dtype=np.int64)
    for symbol in range(257):
        for b in range(int(lengths[symbol])):
            reversed_codes[symbol] |= ((msb_first[symbol] >> b) & 1) << (lengths[symbol] - 1 - b)
    symbols = np.append(src.astype(np.int64), EOB)
    parts = [
        np.unpackbits(np.asarray(head, dtype=np.uint8), bitorder="little")[:head_bits],
        _bits(reversed_codes[symbols], lengths[symbols]),
    ]
    if not final:
        parts.append(np.zeros(3, dtype=np.uint8))  # BFINAL 0, BTYPE 00
    stream = np.concatenate(parts)
    stream = np.append(stream, np.zeros(-stream.size % 8, dtype=np.uint8))
    block = np.packbits(stream, bitorder="little")
    if not final:
        block = np.append(block, np.array([0, 0, 0xFF, 0xFF], dtype=np.uint8))
    out[: block.size] = block
    return block.size
