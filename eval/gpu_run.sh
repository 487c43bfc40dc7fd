#!/usr/bin/env bash
# One device call: install, run the kernel tests compiled on the GPU, the kernel and decode benchmarks, end to end,
# then the attention error on activations captured from the shared models (when .devshare/ holds them: carry it).
# Usage (from the repository root on the GPU machine): bash eval/gpu_run.sh [bench_kernels arguments]
set -uo pipefail
source eval/gpu_setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_timm_patch.py tests/test_attention.py \
  tests/test_models.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -n 15
python3 -m hf_distrattn.eval.bench_kernels --json "$OUT/kernels.json" --markdown "$OUT/kernels.md" "$@"
python3 -m hf_distrattn.eval.bench_decode --json "$OUT/decode.json" --markdown "$OUT/decode.md"
python3 -m hf_distrattn.eval.bench_e2e --json "$OUT/e2e.json" --markdown "$OUT/e2e.md"
if [ -d .devshare/models/ref-llama-bytes ] && [ -d .devshare/models/ref-vit-fmnist ]; then
  python3 -m hf_distrattn.eval.activation_error --lm .devshare/models/ref-llama-bytes \
    --text-file .devshare/data/heldout_kjv.txt --vit .devshare/models/ref-vit-fmnist \
    --dataset .devshare/data/fashion-mnist-test.parquet --json "$OUT/activation_error.json" \
    --markdown "$OUT/activation_error.md"
fi
