"""Attention kernel benchmark: distr (G = 1, 2, 4) against SDPA's flash, cuDNN and memory-efficient backends and
the ``sageattention`` wheel, in one run on one GPU.

Times are medians of ``triton.testing.do_bench`` after warm-up, on random normal inputs; distr is timed whole
(pre-pass + kernel) and kernel-only, and where the Hopper kernel runs (an sm_90 GPU, ``hf_distrattn.plan.sm90_refusal``)
the portable kernel alone as well. Effective TFLOP/s = 4·B·H·Nq·Nk·d / t, halved when causal. The error
column is ‖out − exact‖/‖exact‖ against float32 SDPA on the same inputs.

    python -m hf_distrattn.eval.bench_kernels --json results/kernels.json --markdown results/kernels.md
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
from ..grouping import hash_directions, padded_width
from ..kernels import prefill
from ..kernels.subspace import subspace_reduced
from ..plan import sm90_refusal
from .common import write_results


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return lambda: sdpa_kernel(backend)


def _distr(q, k, v, causal, config):
    """The whole call, as users make it (causal calls group causally: first query block exact)."""
    return distr_attention(q, k, v, causal=causal, config=config)


def _prepass(q, k, v, causal, config):
    """The pre-pass: LSH's grouping kernel, or ``"subspace"``'s reduced keys and query factors."""
    if config.grouping == "subspace":
        return subspace_reduced(q, k, config, padded_width(q.shape[-1] // config.group_size))[:2]
    hashes = hash_directions(config.block_size, config.num_hashes, config.seed, q.device)
    return prefill.prepare(q, k, v, config, causal_grouping=causal, hashes=hashes)


def _kernel(q, k, v, causal, config, prepared, **launch):
    """The attention kernel alone, on the pre-pass's output ``prepared`` (``portable=True``: the portable kernel
    where the Hopper one would run)."""
    ready = dict(subspace=prepared) if config.grouping == "subspace" else dict(prepared=prepared)
    return prefill.distr_attention_triton(q, k, v, causal=causal, config=config, causal_grouping=causal,
                                          **ready, **launch)[0]


def median_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


LAUNCHES = [dict(block_n=64, num_warps=4, num_stages=2), dict(block_n=64, num_warps=4, num_stages=3),
            dict(block_n=128, num_warps=8, num_stages=3), dict(block_n=64, num_warps=8, num_stages=3),
            dict(block_n=128, num_warps=4, num_stages=2), dict(block_n=32, num_warps=4, num_stages=3)]


def methods(groups, block_sizes, groupings=("lsh",)):
    """name -> (context factory, fn(q, k, v, causal)); ``"subspace"`` rows (``G > 1``) reduce the keys."""
    out = {}
    for name in ("flash", "cudnn", "efficient"):
        out[f"sdpa-{name}"] = (sdpa_backend(name),
                               lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c))
    try:
        from sageattention import sageattn

        out["sageattn-1"] = (nullcontext, lambda q, k, v, c: sageattn(q, k, v, tensor_layout="HND", is_causal=c))
    except Exception as error:  # noqa: BLE001 - the peer is optional; say why it is absent
        print(f"sageattention unavailable: {error}")
    for grouping in groupings:
        for group in groups if grouping == "lsh" else [g for g in groups if g > 1]:
            for block in block_sizes:
                config = DistrConfig(group_size=group, block_size=block, backend="triton", grouping=grouping,
                                     sampled="k" if grouping == "subspace" else "q")
                name = f"distr-G{group}-b{block}" + ("" if grouping == "lsh" else f"-{grouping}")
                out[name] = (nullcontext, partial(_distr, config=config))
    return out


def bench(seq_lens, head_dims, causals, groups, block_sizes, dtype=torch.bfloat16, tokens=65536, tune=(),
          groupings=("lsh",)):
    """``tune``: sequence lengths at which every launch in LAUNCHES is timed for the distr kernels."""
    rows = []
    table = methods(groups, block_sizes, groupings)
    for d in head_dims:
        heads = 2048 // d  # hidden 2048, like Llama-3.2-1B
        for n in seq_lens:
            batch = max(1, tokens // n)
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q, k, v = (torch.randn(batch, heads, n, d, device="cuda", generator=g, dtype=dtype) for _ in range(3))
            for causal in causals:
                flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
                exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
                for name, (context, fn) in table.items():
                    row = {"method": name, "d": d, "n": n, "batch": batch, "heads": heads, "causal": causal}
                    try:
                        with context():
                            out = fn(q, k, v, causal)
                            ms = median_ms(partial(fn, q, k, v, causal))
                        row |= {"ms": ms, "tflops": flops / ms / 1e9,
                                "rel_err": ((out.float() - exact).norm() / exact.norm()).item()}
                        if name.startswith("distr"):
                            cfg = fn.keywords["config"]
                            ready = _prepass(q, k, v, causal, cfg)
                            row["prepass_ms"] = median_ms(partial(_prepass, q, k, v, causal, cfg))
                            row["kernel_ms"] = median_ms(partial(_kernel, q, k, v, causal, cfg, ready))
                            sm90 = sm90_refusal(q, k, v, cfg.group_size, cfg.block_size, False, None, None) is None
                            if cfg.grouping != "subspace" and sm90:
                                row["portable_kernel_ms"] = median_ms(partial(_kernel, q, k, v, causal, cfg, ready,
                                                                              portable=True))
                            if n in tune:
                                row["launches"] = [
                                    launch | {"kernel_ms": median_ms(partial(_kernel, q, k, v, causal, cfg, ready,
                                                                             **launch))}
                                    for launch in LAUNCHES]
                    except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is reported
                        row["error"] = str(error).splitlines()[0][:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del exact
    return rows


def markdown(rows) -> str:
    keys = sorted({(r["d"], r["n"], r["causal"]) for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| d | N | causal | " + " | ".join(names) + " |", "|---|---|---|" + "---:|" * len(names)]
    for d, n, causal in keys:
        cells = []
        by = {r["method"]: r for r in rows if (r["d"], r["n"], r["causal"]) == (d, n, causal)}
        peers = [by.get(peer, {}).get("ms") for peer in ("sdpa-flash", "sdpa-cudnn")]
        for name in names:
            r = by.get(name, {})
            if "ms" not in r:
                cells.append("—")
            else:
                ratios = ", ".join(f"{peer / r['ms']:.2f}×" if peer else "—" for peer in peers)
                cells.append(f"{r['tflops']:.0f} ({ratios})")
        lines.append(f"| {d} | {n} | {causal} | " + " | ".join(cells) + " |")
    return "TFLOP/s (speed-up over sdpa-flash, over sdpa-cudnn)\n\n" + "\n".join(lines) + _kernels_alone(rows)


def _kernels_alone(rows) -> str:
    """Where the Hopper kernel ran: the attention kernel alone (no pre-pass), Hopper against portable, TFLOP/s
    (speed-up over sdpa-cudnn)."""
    ran = [r for r in rows if "portable_kernel_ms" in r]
    if not ran:
        return ""
    cudnn = {(r["d"], r["n"], r["causal"]): r["ms"] for r in rows if r["method"] == "sdpa-cudnn" and "ms" in r}
    lines = ["| d | N | causal | setting | sm90 kernel | portable kernel |", "|---|---|---|---|---:|---:|"]
    for r in ran:
        peer = cudnn.get((r["d"], r["n"], r["causal"]))
        cells = [f"{r['tflops'] * r['ms'] / ms:.0f}" + (f" ({peer / ms:.2f}×)" if peer else "")
                 for ms in (r["kernel_ms"], r["portable_kernel_ms"])]
        lines.append(f"| {r['d']} | {r['n']} | {r['causal']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n\nKernel alone where the Hopper kernel runs, TFLOP/s (speed-up over sdpa-cudnn)\n\n" + "\n".join(lines)


def plot(rows, path) -> None:
    """Effective TFLOP/s against sequence length, one line per method, one panel per (head dim, causal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d"], r["causal"]) for r in rows if "tflops" in r})
    columns = min(2, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (d, causal) in zip(axes.flat, panels, strict=False):  # the grid may hold more axes than panels
        for name in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["n"], r["tflops"]) for r in rows
                            if r["method"] == name and (r["d"], r["causal"]) == (d, causal) and "tflops" in r)
            if points:
                ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=name,
                        linestyle="--" if not name.startswith("distr") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("effective TFLOP/s (4·B·H·N²·d, halved when causal)")
        ax.set_title(f"d={d}, {'causal' if causal else 'not causal'}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--groupings", nargs="+", choices=["lsh", "subspace"], default=["lsh", "subspace"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--tune", type=int, nargs="*", default=[], help="sequence lengths to sweep launches at")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot", help="speed against sequence length, PNG")
    parser.add_argument("--replot", help="only draw --plot from this earlier --json (no GPU)")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.load(open(args.replot))["rows"], args.plot or "speed_vs_seq_len.png")
        return
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = bench(args.seq_lens, args.head_dims, causals, args.groups, args.block_sizes, tune=args.tune,
                 groupings=args.groupings)
    write_results(args.json, args.markdown, "bf16", rows, markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
