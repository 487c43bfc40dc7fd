#!/usr/bin/env bash
# One device call: install, then `hf-distrattn finetune --config CONFIG` once per --attn setting given after it,
# paths overridden for a copy of ../shared in .devshare/ (carry it); results in $OUT/finetune-<n>/finetune.json.
# Usage: bash eval/gpu_finetune.sh configs/finetune-ref-llama-bytes.yaml "distr:group_size=2,block_size=16,grouping=lsh" ...
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
config=$1
shift
source eval/gpu_setup.sh
n=0
for attn in "$@"; do
  n=$((n + 1))
  python3 - "$config" "$attn" "$OUT/finetune-$n" <<'PY' 2>&1 | grep -v "it/s\]" | tail -n 12
import sys

import yaml

from hf_distrattn.cli import main

config, attn, out = sys.argv[1:]
values = yaml.safe_load(open(config))
args = ["finetune", "--config", config, "--attn", attn, "--output-dir", out]
for key in ("model", "text_file", "eval_text_file", "dataset", "eval_dataset"):
    path = values.get(key)
    if path and path.startswith(("../shared/", "data/")):
        args += ["--" + key.replace("_", "-"), ".devshare/" + path.removeprefix("../shared/")]
sys.exit(main(args))
PY
  rm -rf "$OUT/finetune-$n"/checkpoint-* "$OUT/finetune-$n"/final
done
