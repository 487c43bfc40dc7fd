"""The 8B chunked prefill into a 128k static cache, eager, on the 8B shape cut to ``LAYERS`` layers (default 2):
per setting the plan of one chunk, two timed ``generate(max_new_tokens=1)`` (the first builds the kernels) and the
top CUDA kernels of a third. Run on the GPU from the repository root (seventeenth session, ``diag8b_prefill.log``):

    python3 docs/speed/2026-12-06-h100-s17/diag8b.py distr:group_size=4,sampled=k,grouping=lsh
"""

import json
import os
import sys
import time

import torch

from hf_distrattn.eval import bench_e2e
from hf_distrattn.plan import plan
from hf_distrattn.settings import parse_settings

layers = int(os.environ.get("LAYERS", "2"))
n = int(os.environ.get("PROMPT", "131072"))
chunk = int(os.environ.get("CHUNK", "16384"))
bench_e2e.LLAMA_SHAPES["8b"][1]["num_hidden_layers"] = layers
model, _, geometry = bench_e2e.llama("8b")
prompt = torch.randint(0, geometry["vocab_size"], (1, n), device="cuda")
rows = []
for spec in sys.argv[1:]:
    bench_e2e.use(model, spec)
    (_, _, config), = parse_settings([spec])
    if config is not None:
        q = torch.empty(1, 32, chunk, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(1, 8, n + 1, 128, device="cuda", dtype=torch.bfloat16)
        chosen = plan(q, k, config, causal_grouping=True)
        print(spec, "chunk plan:", chosen.path, chosen.reason, flush=True)

    def prefill():
        model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk,
                       cache_implementation="static")

    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        prefill()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        print(spec, f"prefill {n} ({layers} layers): {seconds[-1]:.2f} s", flush=True)
    kernels = bench_e2e.top_kernels(prefill, calls=1, top=8)
    for ms, count, name in kernels:
        print(f"    {ms:9.1f} ms {count:5d}x {name}", flush=True)
    rows.append({"attn": spec, "seconds": seconds, "kernels": kernels})
with open(os.path.join(os.environ.get("OUT", "."), "diag8b.json"), "w") as f:
    json.dump(rows, f, indent=1)
