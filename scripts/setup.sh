#!/usr/bin/env bash
# Creates .venv and installs diffusers-offload with its test tools. Idempotent: safe to run again.
# Without a visible NVIDIA GPU it pins torch==2.13.0, which machines set up with a local CPU wheel take
# from disk; elsewhere point PIP_INDEX_URL at a CPU wheel index to avoid the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.6"
else
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
