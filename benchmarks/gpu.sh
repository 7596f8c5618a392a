#!/usr/bin/env bash
# The GPU figures of README "Performance", on one H100/H200 in bf16: the ~1B dense Llama shape and the
# Mixtral-style MoE shape, each beside transformers in the same process, plus the top operators of 2 profiled
# steps of each. Usage, from the repository root on the GPU machine (its CUDA build of torch installed):
#   bash benchmarks/gpu.sh [OUT_DIR] [extra key=value overrides for both shapes ...]
# OUT_DIR (default bench_gpu) receives bench_1b.json, bench_moe_gpu.json and the two logs. Wheels for anything
# the machine lacks (e.g. megatron-core on a bare CUDA image) may be put in .whl/ first: they are installed
# into /tmp/site without touching the machine's packages.
set -uo pipefail
out=${1:-bench_gpu}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
for shape in bench_1b bench_moe_gpu; do
    timeout 280 python3 -m pretrain bench "configs/$shape.yaml" --against hf --out "$out/$shape.json" \
        --profile "/tmp/profile_$shape" "$@" 2>&1 | tee "$out/$shape.log" || status=1
done
exit $status
