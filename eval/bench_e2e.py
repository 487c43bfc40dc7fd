"""End-to-end latency with random weights of real geometries, ``sdpa`` against ``distr`` settings, one GPU:

- Llama-3.2-1B shape (16 layers, hidden 2048, 32 query / 8 KV heads, head_dim 64): prefill at each
  ``--prefill`` length (batch 1, last-token logits only) and greedy decode tokens/s after a 4k prompt;
- ViT-B/16 shape (12 layers, hidden 768, 197 tokens): batch-256 inference.

Times are medians over ``--reps`` CUDA-event-timed runs after one warm-up.

    python -m hf_distrattn.eval.bench_e2e --json results/e2e.json --markdown results/e2e.md
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from .common import apply_setting, cuda_ms, parse_settings, write_results

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)


def use(model, spec: str) -> None:
    (_, name, config), = parse_settings([spec])
    apply_setting(model, name, config)


@torch.no_grad()
def bench_llama(specs, prefill_lens, decode_prompt, decode_tokens, reps):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to("cuda", torch.bfloat16).eval()
    rows = []
    for spec in specs:
        use(model, spec)
        for n in prefill_lens:
            ids = torch.randint(0, LLAMA_1B["vocab_size"], (1, n), device="cuda")
            ms = cuda_ms(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), reps)
            rows.append({"model": "llama-3.2-1b-shape", "attn": spec, "task": f"prefill {n}", "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
        prompt = torch.randint(0, LLAMA_1B["vocab_size"], (1, decode_prompt), device="cuda")

        def decode(prompt=prompt):
            model.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                           pad_token_id=0)

        ms = cuda_ms(decode, max(1, reps // 2))
        prefill_ms = cuda_ms(lambda prompt=prompt: model(prompt, logits_to_keep=1), reps)
        rows.append({"model": "llama-3.2-1b-shape", "attn": spec, "task": f"decode after {decode_prompt}",
                     "ms": ms, "tokens_per_s": decode_tokens / ((ms - prefill_ms) / 1000)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def bench_vit(specs, batch, reps):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig()).to("cuda", torch.bfloat16).eval()
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    rows = []
    for spec in specs:
        use(model, spec)
        ms = cuda_ms(lambda: model(pixel_values=pixels), reps)
        rows.append({"model": "vit-b16-shape", "attn": spec, "task": f"batch {batch}", "ms": ms,
                     "images_per_s": batch / ms * 1000})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| model | task | attention | ms | vs sdpa |", "|---|---|---|---:|---:|"]
    base = {(r["model"], r["task"]): r["ms"] for r in rows if r["attn"] == "sdpa"}
    for r in rows:
        ref = base.get((r["model"], r["task"]))
        speed = f"{ref / r['ms']:.2f}×" if ref else "—"
        extra = f" ({r['tokens_per_s']:.0f} tok/s)" if "tokens_per_s" in r else ""
        lines.append(f"| {r['model']} | {r['task']} | {r['attn']} | {r['ms']:.2f}{extra} | {speed} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "distr:group_size=1,block_size=128",
                                                      "distr:group_size=4,block_size=128",
                                                      "distr:group_size=2,sampled=k"])
    parser.add_argument("--prefill", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--decode-prompt", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--vit-batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = bench_llama(args.attn, args.prefill, args.decode_prompt, args.decode_tokens, args.reps)
    rows += bench_vit(args.attn, args.vit_batch, args.reps)
    write_results(args.json, args.markdown, "bf16, random weights", rows, markdown(rows))


if __name__ == "__main__":
    main()
