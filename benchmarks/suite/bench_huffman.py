"""Huffman-only deflate blocks of a byte plane: ccdgrid's kernel against the libraries.

asv module (classes with ``params``/``setup``/``time_*``). The plane is the
exponent byte of a corrected 2048² (or ``size``²) frame of noisy counts:
four distinct values, ~1.2 bits of entropy a byte, no repeats for LZ77.
Engines: ccdgrid's kernel (``ccdgrid._huffman.deflate_block``, the code
from the plane's histogram), its numpy twin (small sizes only: a
specification, not a contender), zlib's ``Z_HUFFMAN_ONLY`` strategy (the
same kind of block), and zlib and ISA-L (python-isal, when installed) at
level 1, which search for matches.

Run directly for a side-by-side in one process, medians of 7, with the
compressed sizes::

    python benchmarks/suite/bench_huffman.py [size ...]
"""

import sys
import time
import zlib

import numpy as np

__all__ = ["EncodePlane"]


def exponent_plane(size, seed=0):
    """The exponent byte of float32 frames of counts 100-4000 mixed with a neighbour."""
    rng = np.random.default_rng(seed)
    base = rng.integers(100, 4000, (size, size)).astype(np.float32)
    weight = rng.random((size, size)).astype(np.float32)
    frame = base * weight + np.roll(base, 1, axis=1) * (1 - weight)
    return np.ascontiguousarray(frame.astype(np.float32).view(np.uint8)[:, 3::4]).reshape(-1)


def _engines(plane):
    from ccdgrid import _huffman
    from ccdgrid._reference import huffman as twin

    def ccdgrid_block():
        return _huffman.deflate_block(plane, final=True)

    def numpy_twin():
        lengths = _huffman.literal_lengths(twin.histogram(plane))
        head, bits = _huffman._header(lengths, True)
        out = np.empty(twin.encoded_bound(plane.size, bits), dtype=np.uint8)
        return out[: twin.encode_block(plane, head, bits, lengths, True, out)]

    def zlib_huffman_only():
        c = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
        return c.compress(plane) + c.flush()

    def zlib_level1():
        c = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(plane) + c.flush()

    engines = {
        "ccdgrid": ccdgrid_block,
        "numpy twin": numpy_twin,
        "zlib Huffman-only": zlib_huffman_only,
        "zlib level 1": zlib_level1,
    }
    try:
        from isal import isal_zlib
    except ImportError:
        return engines

    def isal_level1():
        c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(plane) + c.flush()

    engines["ISA-L level 1"] = isal_level1
    return engines


class EncodePlane:
    params = (
        [256, 2048],
        ["ccdgrid", "numpy twin", "zlib Huffman-only", "zlib level 1", "ISA-L level 1"],
    )
    param_names = ("size", "engine")

    def setup(self, size, engine):
        if engine == "numpy twin" and size > 256:
            raise NotImplementedError("the numpy twin is a specification: small sizes only")
        engines = _engines(exponent_plane(size))
        if engine not in engines:
            raise NotImplementedError(f"{engine} not installed")
        self.encode = engines[engine]

    def time_encode(self, size, engine):
        self.encode()


def main(sizes):
    for size in sizes:
        plane = exponent_plane(size)
        engines = _engines(plane)
        if size > 256:
            engines.pop("numpy twin")
        times = {name: [] for name in engines}
        sizes_out = {}
        for _ in range(7):  # the engines interleaved: all see the same load
            for name, encode in engines.items():
                start = time.perf_counter()
                block = encode()
                times[name].append(time.perf_counter() - start)
                sizes_out[name] = len(block)
                assert zlib.decompress(bytes(block), -zlib.MAX_WBITS) == plane.tobytes()
        base = np.median(times["ccdgrid"])
        print(f"exponent plane of a {size}² float32 frame ({plane.size} bytes), medians of 7:")
        for name in engines:
            t = np.median(times[name])
            print(
                f"  {name:18s} {t * 1e3:8.2f} ms  x{t / base:6.2f}  "
                f"{sizes_out[name] / plane.size:6.1%} of the plane"
            )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256, 2048])
