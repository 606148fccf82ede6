"""Huffman-only deflate blocks (RFC 1951) of byte planes: a histogram and an encoder.

A byte plane with few distinct values and no long repeats (the exponent
byte of noisy float32 frames: 1-3 bits of entropy a byte) gains nothing
from LZ77 matching, which is what a general deflate spends its time on.
Coding every byte as a literal with a Huffman code built for the plane is
several times faster, and smaller whenever the matches would not have paid.

The code lengths, the block header and the decision to use such a block are
the façade's (``ccdgrid._huffman``); the kernels here count the bytes and
write the bits. Bit order is deflate's: bits fill each byte from its least
significant bit, and Huffman codes are sent most significant bit first, so
the façade hands over every code already bit-reversed.

The kernels check what could make them write out of bounds or write a
block an inflater refuses (buffer sizes, header bits, the code's lengths),
and trust the rest to the façade: C-contiguous arrays, and that every byte
to encode has a code (``deflate_block`` checks a caller's code).
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define CCDGRID_TO_LE64(x) __builtin_bswap64(x)
    #else
    #define CCDGRID_TO_LE64(x) (x)
    #endif
    """
    uint64_t CCDGRID_TO_LE64(uint64_t) nogil

cdef enum:
    EOB = 256  # the end-of-block symbol of the literal/length alphabet


def histogram(const uint8_t[::1] src):
    """How often each byte value occurs in ``src``: ndarray of int64, shape (256,)."""
    # four tables, so that runs of one value do not serialise on one counter
    cdef uint32_t tables[4][256]
    cdef Py_ssize_t n = src.shape[0], i, m, done = 0, stop
    cdef int64_t[::1] counts
    cdef const uint8_t* s = &src[0] if n else NULL
    result = np.zeros(256, dtype=np.int64)
    counts = result
    with nogil:
        while done < n:
            # uint32 counters cannot overflow within 2**30 bytes
            stop = min(n, done + (<Py_ssize_t>1 << 30))
            memset(tables, 0, sizeof(tables))
            m = done + (stop - done) // 4 * 4
            i = done
            while i < m:
                tables[0][s[i]] += 1
                tables[1][s[i + 1]] += 1
                tables[2][s[i + 2]] += 1
                tables[3][s[i + 3]] += 1
                i += 4
            while i < stop:
                tables[0][s[i]] += 1
                i += 1
            for i in range(256):
                counts[i] += <int64_t>tables[0][i] + tables[1][i] + tables[2][i] + tables[3][i]
            done = stop
    return result


cdef bint _canonical(const uint8_t[::1] lengths, uint32_t* code, uint32_t* width):
    """Deflate's canonical codes for ``lengths`` (RFC 1951, 3.2.2), bit-reversed, into
    ``code``; the lengths into ``width``. False unless the lengths make a code an
    inflater accepts: none above 15 bits, and complete (Kraft sum 1), or one
    code of one bit (zlib refuses other incomplete literal codes)."""
    cdef uint32_t count[16]
    cdef uint32_t next_code[16]
    cdef uint32_t value, reversed_value
    cdef Py_ssize_t k, n = lengths.shape[0]
    cdef int bits, b
    cdef uint64_t kraft = 0
    memset(count, 0, sizeof(count))
    for k in range(n):
        if lengths[k] > 15:
            return False
        count[lengths[k]] += 1
        if lengths[k]:
            kraft += <uint64_t>1 << (15 - lengths[k])
    if kraft != (<uint64_t>1 << 15) and not (kraft == (<uint64_t>1 << 14) and count[1] == 1):
        return False
    count[0] = 0
    value = 0
    next_code[0] = 0
    for bits in range(1, 16):
        value = (value + count[bits - 1]) << 1
        next_code[bits] = value
    for k in range(n):
        bits = lengths[k]
        width[k] = bits
        code[k] = 0
        if bits == 0:
            continue
        value = next_code[bits]
        next_code[bits] += 1
        reversed_value = 0
        for b in range(bits):
            reversed_value = (reversed_value << 1) | ((value >> b) & 1)
        code[k] = reversed_value
    return True


def code_lengths(const int64_t[::1] counts, int limit):
    """Lengths of a minimum-redundancy prefix code for symbols seen ``counts`` times.

    Huffman's construction with two queues (leaves sorted by count, then
    symbol; merged nodes in the order they are made), taking a leaf before
    a merged node of the same weight: the tree ``heapq`` builds from
    ``(count, node id)`` pairs, leaves numbered first. When a code would
    exceed ``limit`` bits, the counts are halved (rounding up) and the code
    built again; equal counts give a balanced tree, so this ends once
    ``2**limit`` is at least the number of symbols seen.

    Parameters
    ----------
    counts : ndarray of int64, shape (n,)
        Non-negative, ``n <= 2**limit``.
    limit : int
        Longest code allowed, 1 to 30.

    Returns
    -------
    ndarray of uint8, shape (n,)
        0 for a symbol never seen; 1 for the only one seen, if so.
    """
    cdef Py_ssize_t n = counts.shape[0], m = 0, k, i
    if not 1 <= limit <= 30 or n > (<Py_ssize_t>1 << limit):
        raise ValueError("limit must be 1 to 30, with at most 2**limit symbols")
    result = np.zeros(n, dtype=np.uint8)
    cdef uint8_t[::1] lengths = result
    order = np.argsort(counts, kind="stable")
    cdef const int64_t[::1] sorted_symbols = order
    cdef int64_t[::1] weight = np.zeros(2 * n + 1, dtype=np.int64)
    cdef int64_t[::1] parent = np.zeros(2 * n + 1, dtype=np.int64)
    cdef int64_t[::1] depth = np.zeros(2 * n + 1, dtype=np.int64)
    cdef int64_t[::1] leaf = np.zeros(n + 1, dtype=np.int64)
    cdef Py_ssize_t li, ni, made, pick, a, b
    cdef int64_t deepest, w, s
    for k in range(n):
        if counts[sorted_symbols[k]] < 0:
            raise ValueError("counts must be non-negative")
        if counts[sorted_symbols[k]] > 0:
            leaf[m] = sorted_symbols[k]
            weight[m] = counts[sorted_symbols[k]]
            m += 1
    if m == 1:
        lengths[leaf[0]] = 1
    if m < 2:
        return result
    with nogil:
        while True:
            # leaves are nodes 0..m-1 (sorted), merged nodes m..2m-2 (made in order)
            li, ni, made = 0, m, m
            while made < 2 * m - 1:
                for pick in range(2):
                    if ni < made and (li >= m or weight[ni] < weight[li]):
                        a = ni
                        ni += 1
                    else:
                        a = li
                        li += 1
                    if pick == 0:
                        b = a
                parent[b] = made
                parent[a] = made
                weight[made] = weight[a] + weight[b]
                made += 1
            depth[2 * m - 2] = 0
            deepest = 0
            for i in range(2 * m - 3, -1, -1):
                depth[i] = depth[parent[i]] + 1
                if i < m and depth[i] > deepest:
                    deepest = depth[i]
            if deepest <= limit:
                break
            for i in range(m):
                weight[i] = (weight[i] + 1) // 2
            # halving may make counts equal: put such leaves back in symbol order
            for i in range(1, m):
                w, s = weight[i], leaf[i]
                k = i
                while k > 0 and weight[k - 1] == w and leaf[k - 1] > s:
                    weight[k] = weight[k - 1]
                    leaf[k] = leaf[k - 1]
                    k -= 1
                weight[k] = w
                leaf[k] = s
    for i in range(m):
        lengths[leaf[i]] = <uint8_t>depth[i]
    return result


def encoded_bound(Py_ssize_t n, Py_ssize_t head_bits):
    """Bytes :func:`encode_block` may need for ``n`` bytes after a ``head_bits``-bit header.

    Every code is at most 15 bits; 5 bytes end a block that is not the last
    (an empty stored block), and the writer stores 8 bytes at a time.
    """
    return (head_bits + 15 * (n + 1) + 7) // 8 + 5 + 8


cdef inline uint8_t* _flush(uint8_t* d, uint64_t* buf, int* nb) noexcept nogil:
    """Store the pending bits' whole bytes at ``d`` (8 bytes written); keep the rest."""
    cdef uint64_t word = CCDGRID_TO_LE64(buf[0])
    memcpy(d, &word, 8)
    buf[0] >>= nb[0] & ~7
    d += nb[0] >> 3
    nb[0] &= 7
    return d


def encode_block(const uint8_t[::1] src, const uint8_t[::1] head, Py_ssize_t head_bits,
                 const uint8_t[::1] lengths, bint final, uint8_t[::1] out):
    """Write one deflate block: ``head``, every byte of ``src`` coded, end of block.

    Parameters
    ----------
    src : ndarray of uint8, shape (n,)
        The bytes, each sent as the literal of its value.
    head : ndarray of uint8
        The block's header (BFINAL, BTYPE 10 and the dynamic code tables),
        ``head_bits`` bits in deflate's bit order (bits past them ignored).
    head_bits : int
        Bits of ``head`` to send, ``0 <= head_bits <= 8 * head.size``.
    lengths : ndarray of uint8, shape (257,)
        Code lengths of the byte values then of the end of block, in bits:
        1 to 15 for the end of block and every value present in ``src``
        (unchecked: a value of length 0 would be sent as nothing), 0 for a
        value absent; together a complete prefix code (Kraft sum 1) or a
        single 1-bit code. The codes are deflate's canonical ones for these
        lengths.
    final : bool
        End the stream after this block (pad to a byte); else follow it with
        an empty stored block, as a sync flush does, so that the next piece
        starts on a byte.
    out : ndarray of uint8
        At least ``encoded_bound(n, head_bits)`` bytes.

    Returns
    -------
    int
        Bytes written to ``out``.
    """
    cdef Py_ssize_t n = src.shape[0], i, m, whole = head_bits // 8
    cdef const uint8_t* s = &src[0] if n else NULL
    cdef uint8_t* d = &out[0]
    cdef uint8_t* start = d
    cdef uint64_t buf = 0
    cdef uint32_t code[257]
    cdef uint32_t width[257]
    cdef int nb = head_bits % 8
    cdef uint8_t c
    if head_bits < 0 or head_bits > 8 * head.shape[0]:
        raise ValueError("head_bits must be 0 to 8 * head.size")
    if out.shape[0] < encoded_bound(n, head_bits):
        raise ValueError("output buffer too small")
    if lengths.shape[0] != 257:
        raise ValueError("lengths must have 257 entries")
    if not _canonical(lengths, code, width) or width[EOB] == 0:
        raise ValueError(
            "lengths are no deflate code: above 15 bits, not complete, or no end of block"
        )
    with nogil:
        if whole:
            memcpy(d, &head[0], whole)
            d += whole
        if nb:
            buf = head[whole] & ((<uint64_t>1 << nb) - 1)
        # three codes (<= 45 bits) on top of <= 7 pending bits fit in 64
        m = n // 3 * 3
        i = 0
        while i < m:
            c = s[i]
            buf |= <uint64_t>code[c] << nb
            nb += width[c]
            c = s[i + 1]
            buf |= <uint64_t>code[c] << nb
            nb += width[c]
            c = s[i + 2]
            buf |= <uint64_t>code[c] << nb
            nb += width[c]
            d = _flush(d, &buf, &nb)
            i += 3
        while i < n:
            buf |= <uint64_t>code[s[i]] << nb
            nb += width[s[i]]
            d = _flush(d, &buf, &nb)
            i += 1
        buf |= <uint64_t>code[EOB] << nb
        nb += width[EOB]
        if not final:
            nb += 3  # BFINAL 0, BTYPE 00: a stored block, padded to the byte
        nb = (nb + 7) // 8 * 8
        d = _flush(d, &buf, &nb)
        if not final:
            d[0] = 0  # LEN 0, NLEN 0xFFFF
            d[1] = 0
            d[2] = 0xFF
            d[3] = 0xFF
            d += 4
    return d - start
