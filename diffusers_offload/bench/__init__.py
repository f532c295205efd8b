"""The benchmark: our offloading beside diffusers' on the same models, with the floors measured in the run.
May use everything: it is part of the surface (`diffusers-offload bench`, `benchmarks/bench.py`).
"""

from .harness import BenchConfig, RowResult, format_results, run_bench, run_row, write_json
from .models import MODELS
from .rows import ROWS

__all__ = [
    "MODELS",
    "ROWS",
    "BenchConfig",
    "RowResult",
    "format_results",
    "run_bench",
    "run_row",
    "write_json",
]
