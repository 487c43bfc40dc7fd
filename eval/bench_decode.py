"""Decode benchmark on one GPU: one new query per head against a long KV cache (GQA 32/8 heads), bf16.

Peers in the same run: SDPA as Transformers calls it (``enable_gqa=True``, default dispatch) and under each
backend (flash, cuDNN, memory-efficient; K/V repeated to the query heads where a backend refuses
``enable_gqa``), our exact split-KV kernel (``distr-G1``), and ``sampled="k"`` DistrAttention reading the keys
in reduced form (:mod:`hf_distrattn.kvcache`), timed in the steady state of generation (reduced form up to
date) and, separately, the update that reduces a completed key block (``update_us``, once per 64 tokens). Two
times per step, medians of ``triton.testing.do_bench``: ``us``, eager calls back to back (what Python-driven
generation pays, host launch overhead included), and ``graph_us``, ten steps captured in one CUDA graph and
replayed (device time only, what a CUDA-graph decoder pays). ``bytes`` is what the kernel must read (K and V, or
reduced K, fuse data and V) and ``GB/s`` that over the graph time.

    python -m hf_distrattn.eval.bench_decode --json results/decode.json --markdown results/decode.md
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ..api import distr_attention
from ..config import DistrConfig
from ..kvcache import ReducedKeys
from .bench_kernels import median_ms, sdpa_backend
from .common import write_results


def _sdpa(q, k, v, backend=None):
    """SDPA for one decode step; GQA by ``enable_gqa`` or, where the backend refuses it, repeated K/V."""
    from contextlib import nullcontext

    context = sdpa_backend(backend) if backend else nullcontext

    def gqa():
        with context():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        gqa()
        return gqa
    except RuntimeError:
        rep = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

        def repeated():
            with context():
                return F.scaled_dot_product_attention(q, kr, vr)

        repeated()
        return repeated


def _distr(q, k, v, config):
    """One decode step of ``distr_attention`` (reduced keys up to date for ``sampled="k"``), and the update that
    reduces a just-completed key block (once per ``block_size`` generated tokens), or ``None``."""
    keys = None if config.exact else ReducedKeys(config)

    def step():
        return distr_attention(q, k, v, config=config, causal_grouping=True, reduced_keys=keys)

    def update():
        keys.length = k.shape[2] // config.block_size * config.block_size - config.block_size
        keys.update(k)

    step()
    return step, (update if keys is not None else None)


def graph_us(fn, steps: int = 10) -> float:
    """Device time of one call of ``fn``: ``steps`` calls captured in a CUDA graph, replayed, median / steps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return median_ms(graph.replay) * 1000 / steps


def bench(cache_lens, head_dims, groups, batch=1, heads=(32, 8), block_size=64):
    rows = []
    for d in head_dims:
        for n in cache_lens:
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q = torch.randn(batch, heads[0], 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads[1], n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                    for _ in range(2))
            kv_bytes = 2 * k.numel() * k.element_size()
            cases = {"sdpa": (None, kv_bytes)}
            cases |= {f"sdpa-{name}": (name, kv_bytes) for name in ("flash", "cudnn", "efficient")}
            cases["distr-G1"] = (DistrConfig(group_size=1, backend="triton"), kv_bytes)
            for group in groups:
                config = DistrConfig(group_size=group, block_size=block_size, sampled="k", backend="triton")
                reduced = batch * heads[1] * n * (d // group) * 2 + n // block_size * batch * heads[1] * d * 8
                cases[f"distr-G{group}-k"] = (config, reduced + kv_bytes // 2)
            for name, (setting, nbytes) in cases.items():
                row = {"method": name, "d": d, "cache": n, "batch": batch, "heads": list(heads), "bytes": nbytes}
                try:
                    if isinstance(setting, DistrConfig):
                        fn, update = _distr(q, k, v, setting)
                        if update is not None:
                            row["update_us"] = median_ms(update) * 1000
                    else:
                        fn = _sdpa(q, k, v, setting)
                    row["us"] = median_ms(fn) * 1000
                    row["graph_us"] = graph_us(fn)
                    row["gb_per_s"] = nbytes / row["graph_us"] / 1e3
                except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is reported
                    row["error"] = str(error).splitlines()[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows) -> str:
    keys = sorted({(r["d"], r["cache"]) for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["Decode step, µs: eager calls / CUDA graph (graph speed-up over sdpa's graph) [update µs]", "",
             "| d | cached tokens | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for d, n in keys:
        by = {r["method"]: r for r in rows if (r["d"], r["cache"]) == (d, n)}
        base = by.get("sdpa", {}).get("graph_us")
        cells = []
        for name in names:
            r = by.get(name, {})
            if "graph_us" not in r:
                cells.append("—")
                continue
            cell = f"{r['us']:.1f} / {r['graph_us']:.1f}" + (f" ({base / r['graph_us']:.2f}×)" if base else "")
            cells.append(cell + (f" [{r['update_us']:.0f}]" if "update_us" in r else ""))
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = bench(args.cache_lens, args.head_dims, args.groups, args.batch)
    write_results(args.json, args.markdown, "bf16 decode", rows, markdown(rows))


if __name__ == "__main__":
    main()
