#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one pass (a lent GPU machine is held for minutes, not hours):
#   bash benchmarks/cuda_check.sh OUTDIR
# 1. the tests parametrized over devices, on cuda (transformers parity in fp32, offloading = resident,
#    slot reuse while the device still reads a slot); 2. decode/prefill of fate vs transformers on the
#    GPU; 3. the offloading policies side by side over the real host→GPU link and over ratio:1
#    (emulated); 4. the whole suite with cuda as the default device (fp16 compute).
# Needs python3 with torch (CUDA), transformers, tokenizers, jinja2, click, safetensors, pytest; hqq and
# gguf may come through EXTRA_PYTHONPATH. Each step has its own time limit; logs land in OUTDIR.
set -u
OUT=${1:-/tmp/fate-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" OMP_NUM_THREADS=4
# STEPS="pytest_cuda pytest_all" runs only the steps named (a short lease); default: all
step() { local t=$1 name=$2; shift 2; [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] && return 0
         echo "=== $name"; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 25 "$OUT/$name.log"; }
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
step 120 pytest_cuda python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_runtime.py tests/test_offload.py \
     tests/test_transfer.py
step 100 runtime_cuda python3 -m benchmarks.runtime --device cuda --threads 4 --reps 3 --variants f16,f16+dense,q4,q4+dense \
     --work /tmp/fate-rt
step 80 offload_cuda_link python3 -m benchmarks.offload --device cuda --threads 4 --link none --mem 50% -r 2
step 80 offload_cuda_ratio1 python3 -m benchmarks.offload --device cuda --threads 4 --link ratio:1 --mem 50% -r 2
step 110 pytest_all python3 -m pytest -q -p no:cacheprovider --ignore tests/test_serve.py
