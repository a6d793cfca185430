#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine (written for one H200; under 8 minutes there):
#   1. the `cuda`-marked tests: SGMV in bf16/fp16 against float64 over rank x popularity, paged
#      attention decode against the reference, CUDA-graph replay against eager, and the whole
#      engine on CUDA against transformers + peft in a mixed batch (torch and Triton attention);
#   2. benchmarks/lora_kernels.py: SGMV bytes/s against a device-to-device copy of the same bytes;
#   3. benchmarks/gpu_decode.py: a Mistral-7B-shaped random model in bf16, 32 rank-8 adapters
#      against base only (Triton attention and CUDA graphs, the CUDA defaults); host -> device adapter load time.
# Runs on the machine's own python3 (torch, triton, transformers, peft preinstalled), with the
# checkout on PYTHONPATH, nothing installed. Results under $OUT (default benchmarks/out/gpu):
# gpu_check.log, cuda_tests.xml, lora_kernels.json/.png, gpu_decode.json. A failing step is
# recorded and the next one still runs; the exit status counts the failed steps.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LORAPLEX_DATA_DIR=/tmp/loraplex-data
PY=${PYTHON:-python3}
failed=0
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name: rc $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
$PY -c 'import torch, triton, transformers, peft, numba, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "numba", numba.__version__,
"device", torch.cuda.get_device_name())'

step cuda-tests 200 $PY -m pytest -q -m cuda -p no:cacheprovider -rA --junitxml="$OUT/cuda_tests.xml" \
  tests/test_lora_ops.py tests/test_sgmv_lora.py tests/test_triton_attention.py tests/test_decode_graphs.py \
  tests/test_lora_parity.py
step lora-kernels 120 $PY benchmarks/lora_kernels.py --out "$OUT"
step gpu-decode 230 $PY benchmarks/gpu_decode.py --out "$OUT"

echo "=== failed steps: $failed"
exit "$failed"
