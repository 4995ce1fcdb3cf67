#!/usr/bin/env bash
# The checks that need a GPU, for a CUDA machine on which smoothrot's dependencies import
# (PYTHONPATH may point at this checkout) and, for `jobs`, the embedded model is installed:
#   bash bench/gpu_check.sh tests [OUTDIR]  # the CUDA tests (skipped on a CPU) + Hadamard timing
#   bash bench/gpu_check.sh jobs [OUTDIR]   # bench_fit and the whole-model W4A4 fit on cuda
#     (WHOLE_MODEL_TIMEOUT seconds for the latter, default 540: 240 s did not suffice on an H200)
# Logs and the whole-model report go to OUTDIR (default outputs/gpu_check); bench/README.md
# quotes them.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_check.sh tests|jobs [OUTDIR]}
out=$(realpath -m "${2:-outputs/gpu_check}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
case $stage in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, transformers, lightning as L; print('torch', torch.__version__,
'transformers', transformers.__version__, 'lightning', L.__version__)"
    $PY -m pytest -q -p no:cacheprovider -rs tests/unit -k cuda 2>&1 | tee "$out/tests.log"
    (cd bench && $PY bench_hadamard.py --device cuda --tokens 65536 --repeats 20) 2>&1 \
      | tee "$out/hadamard.log"
    ;;
  jobs)  # runs write to a scratch folder; their reports are copied to OUTDIR
    work=$(mktemp -d)
    (cd bench && timeout 180 $PY bench_fit.py --device cuda --output-dir "$work/bench_fit") 2>&1 \
      | grep -v -E "it/s\]|s/it\]" | tee "$out/bench_fit.log"
    timeout "${WHOLE_MODEL_TIMEOUT:-540}" $PY train/fit_scales.py \
      --config configs/whole_model_vllm.yaml --schemes w4a4-mse \
      --methods smoothrot_max+gptq trained_block+gptq --seed 0 --device cuda -q \
      --output-dir "$work/whole_model" 2>&1 | tee "$out/whole_model.log"
    for run in bench_fit whole_model; do
      for f in report.md report.json; do cp "$work/$run/$f" "$out/$run.$f" 2>/dev/null; done
    done
    ;;
  *) echo "unknown stage '$stage': use tests or jobs" >&2; exit 2 ;;
esac
