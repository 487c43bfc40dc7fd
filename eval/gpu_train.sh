#!/usr/bin/env bash
# One device call for the training path: install, the backward and kernel tests compiled on the GPU, then the
# training benchmark (backward launch sweep, attention forward+backward table, Llama-1B-shape training step).
# Usage (from the repository root on the GPU machine): bash eval/gpu_train.sh [bench_training arguments]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
python3 -m pytest -q -p no:cacheprovider tests/test_backward.py tests/test_kernels.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -n 15
python3 -m hf_distrattn.eval.bench_training --json "$OUT/training.json" --markdown "$OUT/training.md" "$@"
