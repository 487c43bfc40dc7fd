#!/usr/bin/env bash
# Device calls for the native ops and torch.compile, one stage per call (each fits a 10-minute call):
#   ops     opcheck of every op on the kernel paths, models compiled with Inductor (CUDA graphs for a static-cache
#           generation) (~4 minutes);
#   tests   the launch cache's tests (direct launches bit for bit), the reduced-key, decode, subspace, head-dim and
#           Hopper-kernel tests, a compiled ViT on the Hopper kernel (~5 minutes)
#   kernels the rest of the kernel and backward tests compiled (~7 minutes)
#   decodebench  the decode kernel benchmark: device time (CUDA graphs) and host time, 8k-128k cached tokens
#   models  the model-family matrix (Llama ... gpt-oss, ViT ... SigLIP: windows, softcap, sinks) on the kernels
#   decode  bench_e2e --compile: decode tokens/s after 4k and 32k prompts, static cache, compiled decode step;
#           each row with one step's top CUDA kernels (--profile) and its count of skipped CUDA graphs
#   rest    bench_e2e --compile: prefill at 4k and 16k, the training step at 4k, ViT-B/16 at batch 256 (sdpa as
#           Transformers compiles it, with a dense causal mask, and sdpa_causal, without: bench_e2e's notes); each
#           prefill row names its top CUDA kernels (--profile), so which attention kernel ran is on record
#   decode8b  bench_e2e --compile --llama 8b: decode tokens/s after a 128k prompt (sdpa, G=1, G=4 keys reduced),
#           prefilled once per setting in chunks of 16k (in one piece, sdpa's prefill into the static cache fell to
#           the math kernel and asked for 32 GiB on an H100), each generation continuing from that cache
#           (bench_e2e.ContinuedPrompt, its prefill with disable_compile: on a GPU Transformers compiles a static
#           cache's generation unasked, and compiled 16k chunks skipped every CUDA graph and then crashed, H100,
#           2026-12-06); the prefill's and each generation's wall times are in the log (H100, one setting a
#           process: sdpa 117 s, G=4 keys reduced 302 s, 217 of them its first generation's compile, since cut, and
#           G=1 81 s: the three fit one call)
#   prefill8b bench_e2e --compile --llama 8b: prefill at 64k (sdpa, sdpa_causal, G=1, G=4 LSH)
#   subspace  grouping="subspace" compiled (kernel, backward and op tests), then bench_e2e --compile for it (G=2, G=4)
#           beside sdpa: prefill at 4k and 16k, training step
#   pytest  pytest with the given arguments (a few tests after a change: bash eval/gpu_compile.sh pytest tests/... -k ...)
#   speed   README's kernel table: bench_kernels, LSH blocks of 128 (the Hopper kernel's) against SDPA flash / cuDNN
#           and sageattention at 4k and 16k tokens, pre-pass and kernel timed apart, both kernels alone, the plot
# Usage (from the repository root on the GPU machine): bash eval/gpu_compile.sh STAGE [extra bench_e2e arguments]
# Everything a stage prints is also in $OUT/STAGE.log (what a call cut off at its time limit still brings back).
set -uo pipefail
source eval/gpu_setup.sh
stage=${1:-tests}
shift || true
exec > >(tee "$OUT/$stage.log") 2>&1
case "$stage" in
  ops)
    $PYTEST tests/test_ops.py 2>&1 | tee "$OUT/gpu_ops.log" | tail -n 15
    ;;
  tests)
    $PYTEST tests/test_launch.py tests/test_kernels.py tests/test_hopper.py \
      -k "launch or reduce or decode or subspace or head_dim or hopper" 2>&1 | tee "$OUT/gpu_kernels.log" | tail -n 15
    ;;
  pytest)
    $PYTEST "$@" 2>&1 | tee "$OUT/gpu_pytest.log" | tail -n 30
    ;;
  decodebench)
    python3 -m hf_distrattn.eval.bench_decode --json "$OUT/decode.json" --markdown "$OUT/decode.md" "$@"
    ;;
  kernels)
    $PYTEST tests/test_kernels.py tests/test_backward.py -k "not reduce and not decode and not subspace and not head_dim" \
      2>&1 | tee "$OUT/gpu_kernels.log" | tail -n 15
    ;;
  subspace)
    $PYTEST tests/test_ops.py tests/test_kernels.py tests/test_backward.py -k subspace \
      2>&1 | tee "$OUT/gpu_subspace.log" | tail -n 15
    python3 -m hf_distrattn.eval.bench_e2e --compile --decode-prompt --vit-batch 0 \
      --attn sdpa distr:group_size=2,grouping=subspace,sampled=k distr:group_size=4,grouping=subspace,sampled=k \
      --json "$OUT/e2e_subspace.json" --markdown "$OUT/e2e_subspace.md" "$@"
    ;;
  speed)
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
    python3 -m hf_distrattn.eval.bench_kernels --seq-lens 4096 16384 --block-sizes 128 --groupings lsh \
      --json "$OUT/kernels.json" --markdown "$OUT/kernels.md" --plot "$OUT/speed_vs_seq_len.png" "$@"
    ;;
  models)
    $PYTEST tests/test_model_matrix.py tests/test_kernels.py -k "matrix or windows or windowed or head_dim" \
      2>&1 | tee "$OUT/gpu_models.log" | tail -n 15
    ;;
  decode)
    python3 -m hf_distrattn.eval.bench_e2e --compile --prefill --train-seq-len 0 --vit-batch 0 --profile \
      --attn sdpa distr:group_size=1,block_size=128 distr:group_size=2,sampled=k,grouping=lsh distr:group_size=4,sampled=k,grouping=lsh \
      --json "$OUT/e2e_decode.json" --markdown "$OUT/e2e_decode.md" "$@"
    ;;
  rest)
    python3 -m hf_distrattn.eval.bench_e2e --compile --decode-prompt --profile \
      --attn sdpa sdpa_causal distr:group_size=1,block_size=128 distr:group_size=2,block_size=128,grouping=lsh \
      --json "$OUT/e2e_rest.json" --markdown "$OUT/e2e_rest.md" "$@"
    ;;
  decode8b)
    python3 -m hf_distrattn.eval.bench_e2e --compile --llama 8b --prefill --decode-prompt 131072 --decode-tokens 32 \
      --prefill-chunk 16384 \
      --reps 2 --train-seq-len 0 --vit-batch 0 \
      --attn sdpa distr:group_size=4,sampled=k,grouping=lsh distr:group_size=1,block_size=128 \
      --json "$OUT/e2e_8b_decode.json" --markdown "$OUT/e2e_8b_decode.md" "$@"
    ;;
  prefill8b)
    python3 -m hf_distrattn.eval.bench_e2e --compile --llama 8b --prefill 65536 --decode-prompt --reps 3 \
      --train-seq-len 0 --vit-batch 0 \
      --attn sdpa sdpa_causal distr:group_size=1,block_size=128 distr:group_size=4,block_size=128,grouping=lsh \
      --json "$OUT/e2e_8b_prefill.json" --markdown "$OUT/e2e_8b_prefill.md" "$@"
    ;;
  *)
    echo "unknown stage $stage (ops, tests, pytest, kernels, decodebench, speed, subspace, models, decode, rest, decode8b, prefill8b)" >&2
    exit 2
    ;;
esac
