#!/usr/bin/env bash
# Every check that needs a GPU, as ONE prepared command for the `device` tool (a lent task has 15 minutes
# of device time in all; this script is sized to finish in about 8). Nothing here is a test: the CPU
# suite never needs a GPU.
#
# Here, once (the testbed does not travel with the checkout; 44 MB, under the 64 MiB limit with the repo):
#     echo /.device_testbed/ >> .git/info/exclude && cp -r ../shared/testbed .device_testbed
# Then, with the device tool:  run(command="bash benchmarks/device_checks.sh", carry=[".device_testbed"], timeout_s=570)
# Results come back under $OUT: device.txt, kernel_tests.txt, kernel_gemm.jsonl, quantize_*.json, synthetic_*.json.
#
# The device image has torch, transformers, triton, accelerate, typer, rich, scipy, pyyaml and safetensors
# (device/KINDS.md) but not pulp (only --bits-budget needs it): the package runs from the checkout.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
TESTBED=${TESTBED:-$PWD/.device_testbed}
step() { echo "== $1 ($(date +%T))"; }

step device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

step "kernel tests on the GPU"
timeout 150 python3 -m pytest tests/kernels -q -x -p no:cacheprovider > "$OUT/kernel_tests.txt" 2>&1
tail -3 "$OUT/kernel_tests.txt"

step "dequant-GEMM kernels vs torch (KERNELS.md section 5)"
timeout 150 python3 benchmarks/kernel_gemm.py --json --batches 1 16 256 > "$OUT/kernel_gemm.jsonl" 2> "$OUT/kernel_gemm.err"
tail -3 "$OUT/kernel_gemm.jsonl"

# Time per layer: `--json` reports phase_seconds; the CPU run is the baseline on the same machine (16 cores).
for device in cuda cpu; do
  step "quantize the testbed W4 g128 on $device"
  rm -rf /tmp/q_$device
  timeout 120 python3 -m moecompress quantize "$TESTBED" /tmp/q_$device --bits 4 --group-size 128 --calib mixed \
      --nsamples 128 --seqlen 256 --device $device --json > "$OUT/quantize_testbed_$device.json" 2> "$OUT/quantize_testbed_$device.err"
  tail -c 600 "$OUT/quantize_testbed_$device.json"; echo
done

step "a synthetic 128-expert layer (qwen3_moe, top-8, hidden 2048, expert intermediate 768, 2 layers)"
python3 - "$TESTBED" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from scaling import synthetic_model
synthetic_model(Path("/tmp/synthetic128"), Path(sys.argv[1]), 128, 8, 2048, 768, 2)
PY
for device in cuda cpu; do
  rm -rf /tmp/s_$device
  timeout 150 python3 -m moecompress quantize /tmp/synthetic128 /tmp/s_$device --bits 4 --group-size 128 --calib mixed \
      --nsamples 64 --seqlen 256 --device $device --json > "$OUT/synthetic_$device.json" 2> "$OUT/synthetic_$device.err"
  tail -c 600 "$OUT/synthetic_$device.json"; echo
done
step done
