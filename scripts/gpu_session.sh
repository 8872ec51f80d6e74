#!/usr/bin/env bash
# One GPU session's measurements, in the order the device tool's time limits allow (see docs/benchmarks.md).
#   bash scripts/gpu_session.sh setup      # after the onnxruntime-gpu / diffusers bundle is installed in /tmp/site
#   bash scripts/gpu_session.sh export     # fp16 + fp32 artefacts of the random full-size pipeline, in parallel
#   bash scripts/gpu_session.sh measure    # benchmark.py then fidelity.py, in the background; logs in /tmp/logs
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p /tmp/logs
case "$1" in
  setup)
    mkdir -p /tmp/pkg/audioldm2_trt
    cp "$ROOT"/audioldm2_trt/*.py /tmp/pkg/audioldm2_trt/
    ln -sfn "$ROOT/export" /tmp/pkg/audioldm2_trt/export
    ln -sfn "$ROOT/runtime" /tmp/pkg/audioldm2_trt/runtime
    [ -d "$ROOT/.whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ROOT"/.whl/*.whl
    cd /tmp && python3 -c "import audioldm2_trt.runtime, soxr, pynvml; print('setup ok')" ;;
  export)
    cd /tmp
    setsid python3 -m audioldm2_trt.cli export --random-weights audioldm2 --precision fp16 --out /tmp/art-fp16 --overwrite > /tmp/logs/export16.log 2>&1 &
    setsid python3 -m audioldm2_trt.cli export --random-weights audioldm2 --out /tmp/art-fp32 --overwrite > /tmp/logs/export32.log 2>&1 &
    echo started ;;
  measure)
    cd "$ROOT/scripts"
    rm -f /tmp/logs/done
    setsid bash -c "python3 benchmark.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --runs 10 --out /tmp/logs > /tmp/logs/bench.log 2>&1; \
      python3 fidelity.py --fp16 /tmp/art-fp16 --out /tmp/logs > /tmp/logs/fidelity.log 2>&1; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --out /tmp/logs > /tmp/logs/load.log 2>&1; \
      python3 ort_placement.py /tmp/art-fp16 > /tmp/logs/placement.log 2>&1; touch /tmp/logs/done" &
    echo started ;;
esac
