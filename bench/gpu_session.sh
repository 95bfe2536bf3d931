#!/usr/bin/env bash
# A lent GPU's checks in two calls of under 10 minutes each, from the repository root, after
# `python bench/gpu_bundle.py` filled .gpu/ on the machine that sends the repository:
#   bash bench/gpu_session.sh table    # bench/gpu.py --torch-compile: issue 8's table (~8-9 min on an H200)
#   bash bench/gpu_session.sh checks   # kernel profiles (bench/gpu_profile.py), host-only ceilings (bench/host.py)
#                                      # and the CUDA-only tests (~4 min)
#   bash bench/gpu_session.sh fp8      # the fp8 and quantization-kernel tests, the decode and rerank rows with fp8
#                                      # layers, the decode rows with an fp8 KV cache (~8 min)
# Logs go to $OUT (the device tool's folder that comes back) or /tmp/gpu_session.
set -u
PY=${PY:-python3}  # the GPU image's python3 holds its PyTorch
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"
case "${1:-}" in
  table)
    timeout 580 $PY bench/gpu.py --model .gpu/minilm --data .gpu/scifact --torch-compile 2>&1 | tee "$OUT/gpu_table.txt" | tail -45 ;;
  checks)
    timeout 180 $PY bench/gpu_profile.py --model .gpu/minilm --data .gpu/scifact 2>&1 | tee "$OUT/profile.txt" \
      | grep -v "^USDT\|^STAGE" | tail -100
    timeout 150 $PY bench/host.py --running 256 --steps 40 2>&1 | tee "$OUT/host.txt" | tail -30
    if $PY -c "import pytest" 2>/dev/null; then
      timeout 240 $PY -m pytest -q -x tests/test_attention_kernels.py tests/test_layer_ops.py tests/test_async_scheduling.py 2>&1 | tee "$OUT/tests.txt" | tail -15
    else
      echo "no pytest on this machine: tests not run" | tee "$OUT/tests.txt"
    fi ;;
  fp8)
    if $PY -c "import pytest" 2>/dev/null; then
      timeout 90 $PY -m pytest -q tests/test_quantization.py tests/test_checkpoint_quantization.py tests/test_kv_cache_dtype.py -k "fp8 or kernel or int_mm or pool" 2>&1 | tee "$OUT/fp8_tests.txt" | tail -8
    fi
    timeout 330 $PY bench/gpu.py --quantization fp8 --torch-compile 2>&1 | tee "$OUT/fp8_table.txt" | tail -20
    timeout 150 $PY bench/gpu.py --kv-cache-dtype fp8 --skip rerank 2>&1 | tee "$OUT/fp8_kv_table.txt" | tail -12 ;;
  *)
    echo "usage: bash bench/gpu_session.sh table|checks|fp8" >&2; exit 2 ;;
esac
