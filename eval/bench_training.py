"""Training-speed benchmark on one GPU: attention forward+backward against SDPA's backends, and a full training
step (forward + backward) of a Llama-3.2-1B-shaped model, ``sdpa`` against ``distr`` settings.

Kernel table: B·H filling the GPU (65,536 tokens, hidden 2048), bf16, random normal inputs; medians of
``triton.testing.do_bench`` of the backward alone (``out.backward(dout)``, graph retained) and of forward +
backward. Backward TFLOP/s count 2.5× the forward's ``4·B·H·N²·d`` (five GEMMs against two; halved when causal),
the FlashAttention-2 convention. ``dq_err`` is ‖dQ − dQ_exact‖/‖dQ_exact‖ against float32 SDPA.

    python -m hf_distrattn.eval.bench_training --json results/training.json --markdown results/training.md
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

from ..api import distr_attention
from ..config import DistrConfig
from .bench_e2e import LLAMA_1B, use
from .bench_kernels import median_ms, sdpa_backend
from .common import cuda_ms, write_results


def methods(groups):
    out = {f"sdpa-{name}": (sdpa_backend(name), lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c))
           for name in ("flash", "cudnn", "efficient")}
    for group in groups:
        config = DistrConfig(group_size=group, block_size=64, grouping="lsh", backend="triton")
        out[f"distr-G{group}"] = (nullcontext, lambda q, k, v, c, config=config: distr_attention(
            q, k, v, causal=c, config=config))
    return out


def time_gradients(fn, q, k, v, dout, causal, dq_exact) -> dict:
    """``dq_err``, ``bwd_ms`` (backward of one retained graph) and ``fwd_bwd_ms`` of attention ``fn``."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal)
    out.backward(dout, retain_graph=True)
    dq_err = ((leaves[0].grad.float() - dq_exact).norm() / dq_exact.norm()).item()

    def backward():
        for t in leaves:
            t.grad = None
        out.backward(dout, retain_graph=True)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves, causal).backward(dout)

    return {"dq_err": dq_err, "bwd_ms": median_ms(backward), "fwd_bwd_ms": median_ms(step)}


def bench_kernels(seq_lens, head_dims, causals, groups, tokens=65536):
    rows = []
    table = methods(groups)
    for d in head_dims:
        heads = 2048 // d
        for n in seq_lens:
            batch = max(1, tokens // n)
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q, k, v, dout = (torch.randn(batch, heads, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                             for _ in range(4))
            for causal in causals:
                fwd_flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
                leaves = [t.float().requires_grad_() for t in (q, k, v)]
                F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(dout.float())
                dq_exact = leaves[0].grad
                del leaves
                for name, (context, fn) in table.items():
                    row = {"method": name, "d": d, "n": n, "batch": batch, "heads": heads, "causal": causal}
                    try:
                        with context():
                            row |= time_gradients(fn, q, k, v, dout, causal, dq_exact)
                        row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] / 1e9
                        row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
                    except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is reported
                        row["error"] = str(error).splitlines()[0][:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


TUNE_LAUNCHES = {  # per kernel: (block_m, block_n, num_warps, num_stages); _dkdv wide key tiles, _dq tall query tiles
    "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3),
             (64, 128, 8, 3)],
    "dq": [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
}


def tune_backward(n, head_dims, tokens=65536):
    """Time :func:`attention_backward` (causal, bf16, 32 query / 8 KV heads at d=64) with each launch of
    TUNE_LAUNCHES for one kernel, the other at its default."""
    from ..kernels import backward, prefill

    rows = []
    for d in head_dims:
        heads, batch = 2048 // d, max(1, tokens // n)
        q, dout = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(batch, heads // 4, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = prefill.distr_attention_triton(q, k, v, causal=True, config=DistrConfig(group_size=1))
        for kernel, launches in TUNE_LAUNCHES.items():
            for block_m, block_n, warps, stages in launches:
                launch = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
                row = {"tune": f"backward {kernel}", "d": d, "n": n} | launch
                try:
                    row["ms"] = median_ms(partial(backward.attention_backward, q, k, v, out, lse, dout, causal=True,
                                                  attn_mask=None, scale=d**-0.5, **{kernel: launch}))
                except Exception as error:  # noqa: BLE001 - a launch that does not fit is reported
                    row["error"] = str(error).splitlines()[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_llama_step(specs, seq_len, reps, rounds=3):
    """Forward + backward of a bf16 Llama-3.2-1B-shaped model on one sequence of ``seq_len`` tokens: ``rounds``
    passes over ``specs`` in turn (so that drifts of the machine hit every setting alike), each the median of
    ``reps`` timed steps; the row holds the median over rounds and every round's time."""
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (1, seq_len), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    times = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            use(model, spec)
            times[spec].append(cuda_ms(step, reps, warmup=2))
    rows = []
    for spec in specs:
        ms = statistics.median(times[spec])
        rows.append({"method": spec, "task": f"llama-3.2-1b-shape train step {seq_len}", "ms": ms,
                     "round_ms": times[spec], "tokens_per_s": seq_len / ms * 1000})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(kernel_rows, step_rows) -> str:
    keys = sorted({(r["d"], r["n"], r["causal"]) for r in kernel_rows})
    names = list(dict.fromkeys(r["method"] for r in kernel_rows))
    lines = ["Attention backward TFLOP/s (speed-up of forward+backward over sdpa-flash)", "",
             "| d | N | causal | " + " | ".join(names) + " |", "|---|---|---|" + "---:|" * len(names)]
    for d, n, causal in keys:
        by = {r["method"]: r for r in kernel_rows if (r["d"], r["n"], r["causal"]) == (d, n, causal)}
        flash = by.get("sdpa-flash", {}).get("fwd_bwd_ms")
        cells = []
        for name in names:
            r = by.get(name, {})
            ratio = f" ({flash / r['fwd_bwd_ms']:.2f}×)" if flash and "fwd_bwd_ms" in r else ""
            cells.append(f"{r['bwd_tflops']:.0f}{ratio}" if "bwd_tflops" in r else "—")
        lines.append(f"| {d} | {n} | {causal} | " + " | ".join(cells) + " |")
    if step_rows:
        base = next((r["ms"] for r in step_rows if r["method"] == "sdpa"), None)
        lines += ["", "| training step | attention | ms | tokens/s | vs sdpa |", "|---|---|---:|---:|---:|"]
        for r in step_rows:
            ratio = f"{base / r['ms']:.2f}×" if base else "—"
            lines.append(f"| {r['task']} | {r['method']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="yes")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "distr:group_size=1", "distr:group_size=2,grouping=lsh",
                                                      "distr:group_size=2,block_size=128,grouping=lsh",
                                                      "distr:group_size=4,grouping=lsh"])
    parser.add_argument("--step-seq-len", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tune", action="store_true", help="sweep the backward launches first (causal, N=4096)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    tune_rows = tune_backward(4096, args.head_dims) if args.tune else []
    kernel_rows = bench_kernels(args.seq_lens, args.head_dims, causals, args.groups)
    step_rows = bench_llama_step(args.attn, args.step_seq_len, args.reps, args.rounds) if args.attn else []
    write_results(args.json, args.markdown, "bf16 training", tune_rows + kernel_rows + step_rows,
                  markdown(kernel_rows, step_rows))


if __name__ == "__main__":
    main()
