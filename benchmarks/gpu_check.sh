#!/usr/bin/env bash
# The GPU proof in one command: the CUDA tests, then `diffusers-offload bench` on the real-size models.
#
#   [WHEELS=DIR] [OUT=DIR] [BUDGET_S=480] bash benchmarks/gpu_check.sh
#
# Installs nothing from the network. The package runs from this checkout (pure Python); its runtime needs
# (torch, diffusers, transformers, accelerate, safetensors, pytest) must be importable already, or be
# wheels in WHEELS: those alone are installed (--no-index --no-deps) into a private folder.
# Everything it prints also lands in OUT (default gpu-check-DATE): tests.txt, bench-MODEL.txt and .json.
# Models run in order within BUDGET_S seconds (default 480: 8 minutes): a model still running then is
# stopped (its JSON keeps the rows done, it is written after every row), one that would start after is
# listed as skipped. Each row has ROW_TIMEOUT_S seconds (default 150).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}
budget=${BUDGET_S:-480}
row_timeout=${ROW_TIMEOUT_S:-150}
mkdir -p "$out"
started=$(date +%s)

if [ -n "${WHEELS:-}" ]; then
    site=${SITE:-/tmp/diffusers-offload-site}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl || { echo "installing the wheels in $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi -L 2>&1 || true
    "$python" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/machine.txt"

echo "== CUDA tests" | tee "$out/tests.txt"
timeout 240 "$python" -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee -a "$out/tests.txt"

# model|rows|steps[|extra args]: the full comparison where it fits the budget, the rows that matter most
# where not. The last job saves the real-size SD3.5-medium DiT once (to CKPT) and loads it into the offload
# layout, with every block on the host and with half of them on the disk tier (H2D from the staging buffers).
ckpt=${CKPT:-/tmp/diffusers-offload-sd35m}
for job in \
    "sd35-medium|all|3" \
    "wan21-t2v-14b|none,layerwise-p1,layerwise-p2,budget-50,diffusers-group-block|2" \
    "qwen-image|none,layerwise-p1,budget-50,diffusers-group-block|2" \
    "z-image|none,model,layerwise-p1,budget-50,diffusers-group-block,diffusers-group-leaf|3" \
    "flux1-dev|none,layerwise-p1,budget-50,diffusers-group-block|3" \
    "sd35-medium|none,load-layerwise-p1,load-layerwise-ram50|3|--checkpoint $ckpt"; do
    IFS='|' read -r model rows steps extra <<<"$job"
    read -r -a extra_arg <<<"${extra:-}"
    elapsed=$(($(date +%s) - started))
    if [ "$elapsed" -ge "$budget" ]; then
        echo "== $model: skipped (time budget of ${budget} s spent)" | tee "$out/bench-$model${extra:+-loading}.txt"
        continue
    fi
    row_arg=()
    [ "$rows" = all ] || row_arg=(--rows "$rows")
    echo "== bench $model ${extra:-}(after ${elapsed} s)" | tee "$out/bench-$model${extra:+-loading}.txt"
    timeout $((budget - elapsed)) "$python" -m diffusers_offload.cli bench --model "$model" --device cuda \
        --steps "$steps" "${row_arg[@]}" "${extra_arg[@]}" --row-timeout "$row_timeout" \
        --json "$out/bench-$model${extra:+-loading}.json" 2>&1 | tee -a "$out/bench-$model${extra:+-loading}.txt"
done
echo "gpu_check: done in $(($(date +%s) - started)) s; results in $out"
