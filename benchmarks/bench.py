"""`diffusers-offload bench` as a script, for checkouts without the package installed.

    python benchmarks/bench.py --model tiny-sd3 --device cpu --steps 3
    python benchmarks/bench.py --model sd35-medium --device cuda --json sd35.json

The same harness is importable: `from diffusers_offload.bench import BenchConfig, run_bench,
format_results`; `run_bench(BenchConfig("tiny-sd3", "cpu"), "none,layerwise-p1")` returns the rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_offload.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
