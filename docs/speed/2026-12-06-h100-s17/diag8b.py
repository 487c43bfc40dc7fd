"""Where distr's 8B chunked prefill into a 128k static cache goes: 8B shape cut to 2 layers, per setting one
generate(max_new_tokens=1) (prefill only) timed twice, then its top kernels; plus the plan of a chunk."""
import json, os, sys, time
import torch
import hf_distrattn
from hf_distrattn.eval import bench_e2e as b
from hf_distrattn.plan import plan
from hf_distrattn.settings import parse_settings

layers = int(os.environ.get("LAYERS", "2"))
n = int(os.environ.get("PROMPT", "131072"))
chunk = int(os.environ.get("CHUNK", "16384"))
b.LLAMA_SHAPES["8b"][1]["num_hidden_layers"] = layers
model, name, geo = b.llama("8b")
prompt = torch.randint(0, geo["vocab_size"], (1, n), device="cuda")
out = []
for spec in sys.argv[1:]:
    b.use(model, spec)
    (_, nm, cfg), = parse_settings([spec])
    if cfg is not None:
        q = torch.empty(1, 32, chunk, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(1, 8, n + 1, 128, device="cuda", dtype=torch.bfloat16)
        p = plan(q, k, cfg, causal_grouping=True)
        print(spec, "chunk plan:", p.path, p.reason, flush=True)
    def gen():
        model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk,
                       cache_implementation="static")
    times = []
    for _ in range(2):
        t = time.perf_counter(); gen(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        print(spec, f"prefill {n} ({layers} layers): {times[-1]:.2f} s", flush=True)
    kern = b.top_kernels(gen, calls=1, top=8)
    for k_ in kern:
        print("   ", f"{k_[0]:9.1f} ms {k_[1]:5d}x {k_[2]}", flush=True)
    out.append({"attn": spec, "seconds": times, "kernels": kern, "mem_gb": torch.cuda.max_memory_allocated() / 1e9})
    torch.cuda.reset_peak_memory_stats()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "diag8b.json"), "w"), indent=1)
