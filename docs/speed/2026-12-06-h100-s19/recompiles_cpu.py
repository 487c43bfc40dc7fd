"""CPU: the size and compile time of a compiled static-cache decode step, per setting (the 8B G=4-k first
generation took 217 s against G=1's 27 s on an H100). Prints the calls Dynamo captured and each generation's wall
time (the first one compiles):

    TRITON_INTERPRET=1 python docs/speed/2026-12-06-h100-s19/recompiles_cpu.py 4 sdpa \
        distr:group_size=1,block_size=128 distr:group_size=4,sampled=k,grouping=lsh

Nineteenth session, 4 layers: G=1 271 calls; G=4-k 627 calls and 39 s before e41af50, 259 calls after.
"""
import sys
import time

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import CompileConfig

from hf_distrattn.eval import bench_e2e


def compile_on_cpu() -> dict:
    """bench_e2e's compile config, allowed on a CPU (Transformers compiles on CUDA devices only by default)."""
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    return dict(compile_config=config)


bench_e2e._compile_config = compile_on_cpu
layers = int(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=97, head_dim=32)).eval()
prompt = torch.randint(0, 97, (1, 300))
for spec in sys.argv[2:]:
    bench_e2e.use(model, spec)
    torch._dynamo.reset()
    counters.clear()
    generate = bench_e2e.ContinuedPrompt(model, prompt, 2, 4, None, compile=True)
    for i in range(2):
        start = time.perf_counter()
        generate(4)
        print(spec, f"generation {i}: {time.perf_counter() - start:.1f} s", dict(counters["stats"]), flush=True)
