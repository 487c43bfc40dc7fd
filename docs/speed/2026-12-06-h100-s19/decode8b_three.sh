# Call A: issue 21's 8B decode row after a 128k prompt, sdpa then G=4 keys reduced (then G=1 if time is left).
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv,noheader
start=$SECONDS
run() {  # run TAG LIMIT SETTING
  local tag=$1 limit=$2; shift 2
  echo "=== $tag (limit ${limit}s, at $((SECONDS-start))s)"
  timeout "$limit" bash eval/gpu_compile.sh decode8b --attn "$@"
  echo "=== $tag rc=$? after $((SECONDS-start))s"
  cp "$OUT/decode8b.log" "$OUT/decode8b_$tag.log"
  [ -f "$OUT/e2e_8b_decode.json" ] && mv "$OUT/e2e_8b_decode.json" "$OUT/e2e_8b_decode_$tag.json"
  [ -f "$OUT/e2e_8b_decode.md" ] && mv "$OUT/e2e_8b_decode.md" "$OUT/e2e_8b_decode_$tag.md"
  rm -f "$OUT/decode8b.log"
}
run sdpa 240 sdpa
run g4k $((575 - (SECONDS-start))) distr:group_size=4,sampled=k,grouping=lsh
left=$((580 - (SECONDS-start)))
[ $left -gt 150 ] && run g1 $left distr:group_size=1,block_size=128
cat "$OUT"/e2e_8b_decode_*.md 2>/dev/null
