"""The benchmark scripts the README quotes still run (tiny inputs; no timing is judged).

A refactor once moved a function a benchmark used (``stack._deflate_engine``):
the README's stack figures could no longer be reproduced, and only a
reader of the README found out. Each script runs here on images small
enough to take a second or two, in a fresh interpreter as a user runs it.
"""

import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

# (script and arguments, a line its output must hold)
RUNS = {
    "stack": (
        [
            "stack.py", "--frames", "4", "--size", "256",
            "--modes", "in-memory-frames", "hdf5-gzip", "hdf5-gzip-zlib", "hdf5-raw", "stages",
        ],
        "default settings (isal",
    ),
    "warmstart": (["warmstart.py", "--sizes", "512", "--repeat", "1"], "drift since the previous"),
    "series": (["series.py", "--frames", "2", "--size", "512", "--repeat", "1"], "ratio 2 work"),
    "series-ceiling": (
        ["series.py", "--frames", "2", "--size", "512", "--repeat", "1", "--ceiling"],
        "two workers give at most",
    ),
    "combined": (
        ["combined.py", "--size", "512", "--seeds", "1", "--positions", "2"],
        "combined / single dense RMS",
    ),
    "save": (["save.py", "--size", "256"], "isal-planes"),
    "integration": (["integration.py", "--size", "512"], "max |r_b - r_c|"),
    "validation": (["validation.py", "--size", "512"], "mean mis-placement"),
    "compare-e2e": (["compare.py", "--quick", "--only", "e2e"], "stages ccdgrid"),
    "huffman": (["suite/bench_huffman.py", "64"], "zlib Huffman-only"),
    # one plate of the seventh generator at 1024², calibrated (not refused)
    "outside": (["outside_plates.py", "--size", "1024", "--only", "radial-only"], " log r deg "),
    # two 1024² plates (defects of five kinds), then the summary of the file
    "fuzz": (
        ["fuzz.py", "--seeds", "2,5", "--out", "results.jsonl", "--summary", "results.jsonl"],
        '"seed": 5, "outcome": "OK"',
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RUNS))
def test_the_benchmark_script_runs(name, tmp_path):
    args, expected = RUNS[name]
    if name in ("stack", "save") and not _has_isal():
        expected = "zlib"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert expected in run.stdout, run.stdout[-2000:]


def _has_isal():
    try:
        import isal  # noqa: F401
    except ImportError:
        return False
    return True
