"""asv benchmarks of ccdgrid (``benchmark_dir`` of ``benchmarks/asv.conf.json``).

``bench_pipeline`` measures end to end (``ccdgrid.calibrate`` and the seed
tutorial's pipeline); ``bench_watershed``, ``bench_bilinear`` and
``bench_grid_error`` measure one kernel each against its numpy twin and pyFAI.
"""

import sys
from pathlib import Path

# asv makes only this package importable; the shared helpers (_measure,
# tutorial_pipeline) live one directory up, in benchmarks/.
_BENCHMARKS = str(Path(__file__).resolve().parent.parent)
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)

__all__: list[str] = []
