#!/usr/bin/env bash
# One device call for the training path: install, the backward and kernel tests compiled on the GPU, then the
# training benchmark (backward launch sweep, attention forward+backward table, Llama-1B-shape training step).
# Usage (from the repository root on the GPU machine): bash eval/gpu_train.sh [bench_training arguments]
set -uo pipefail
source eval/gpu_setup.sh
python3 -m pytest -q -p no:cacheprovider tests/test_launch.py tests/test_backward.py tests/test_kernels.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -n 15
python3 -m hf_distrattn.eval.bench_training --json "$OUT/training.json" --markdown "$OUT/training.md" "$@"
