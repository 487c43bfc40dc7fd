"""Decode benchmark on one GPU: one new query per head against a long KV cache (GQA 32/8 heads), bf16.

Peers in the same run: SDPA as Transformers calls it (``enable_gqa=True``, default dispatch) and under each
backend (flash, cuDNN, memory-efficient; K/V repeated to the query heads where a backend refuses
``enable_gqa``), our exact split-KV kernel (``distr-G1``), and ``sampled="k"`` DistrAttention reading the keys
in reduced form from a :class:`~hf_distrattn.cache.ReducedStaticLayer`. A step is what one layer does per
generated token: write the new key and value into a static cache layer (for ``-k`` also reduce the new key)
and attend. Two times per step, medians of ``triton.testing.do_bench``: ``us``, eager calls back to back (what
Python-driven generation pays, host launch overhead included), and ``graph_us``, ten steps captured in one CUDA
graph and replayed (device time only, what a CUDA-graph decoder pays). ``host_us`` / ``call_host_us``: host time
to issue one step / the attention call alone (eager, :func:`host_us`). ``bytes`` is what the attention must read
(K and V, or reduced K, fuse data and V) and ``GB/s`` that over the graph time. ``layer_host_us`` (``sdpa`` and
``distr-G1``): host time of one exact decode-layer call through Transformers' attention interface
(``sdpa_attention_forward`` / ``distr_attention_forward``), what eager generation pays per layer.

``--batch B --ragged``: sequences of different lengths, a left-padded static cache's mask given to every side
(:func:`ragged_mask`; at batch 1 a mask that keeps every slot, as a compiled static-cache decode passes).
``--programs-per-sm N ...``: our kernels at each count of split-KV programs per multiprocessor (rows ``@N/SM``), to
tune the split.

    python -m hf_distrattn.eval.bench_decode --json results/decode.json --markdown results/decode.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
from functools import partial

import torch
import torch.nn.functional as F

from ..api import distr_attention
from ..config import DistrConfig
from ..kernels import decode
from .bench_kernels import median_ms, sdpa_backend
from .common import write_results


def _sdpa(q, k, v, backend=None, mask=None):
    """SDPA for one decode step, ``fn(q, keys, values)``: GQA by ``enable_gqa`` or, where the backend refuses it,
    K/V repeated to the query heads in the call (as Transformers' ``repeat_kv`` does); ``mask`` its ``attn_mask``."""
    context = sdpa_backend(backend) if backend else contextlib.nullcontext

    def gqa(q, k, v):
        with context():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def repeated(q, k, v):
        rep = q.shape[1] // k.shape[1]
        with context():
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                  attn_mask=mask)

    try:
        gqa(q, k, v)
        return gqa
    except RuntimeError:
        repeated(q, k, v)
        return repeated


def host_us(fn, calls: int = 100, rounds: int = 7) -> float:
    """Host time per call: the median over ``rounds`` of ``calls`` eager calls issued back to back, timed on the
    host before synchronizing (fewer launches than the GPU queue holds, so the host never waits for the GPU; the
    median, because one round that meets a garbage collection or a page fault says nothing of the call)."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) / calls * 1e6


def _step(q, k, v, config, attend):
    """One decode step over a static cache layer holding ``k``, ``v`` and the step's own key (the last slot, written
    again at every call): the cache update (and for ``sampled="k"`` the reduction of the new key), then
    ``attend(q, keys, values, layer)``. Returns the step and the attention call alone (on the filled layer)."""
    from transformers.cache_utils import StaticLayer

    from ..cache import ReducedStaticLayer

    n = k.shape[2]
    reduced = isinstance(config, DistrConfig) and config.sampled == "k" and not config.exact
    layer = ReducedStaticLayer(n, config) if reduced else StaticLayer(n)
    layer.update(k[:, :, :-1], v[:, :, :-1])
    new_k, new_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()

    def step():
        layer.cumulative_length.fill_(n - 1)
        keys, values = layer.update(new_k, new_v)
        return attend(q, keys, values, layer)

    step()
    return step, lambda: attend(q, layer.keys, layer.values, layer), layer


def _distr(q, keys, values, layer, config, mask=None):
    reduced = getattr(layer, "reduced", None)
    return distr_attention(q, keys, values, config=config, attn_mask=mask, causal_grouping=True,
                           reduced_keys=reduced)


def ragged_mask(batch: int, n: int, device) -> torch.Tensor:
    """A left-padded batch's mask over a static cache of ``n`` slots, ``(B, 1, 1, n)`` boolean (True = attend), as
    Transformers builds for SDPA: sequence ``i`` holds the last ``n − i·⌊n / 2B⌋`` slots, from all ``n`` down to
    about half. For one sequence every slot is kept: the mask a compiled static-cache decode step passes (every
    side then reads a mask, as there)."""
    lengths = n - torch.arange(batch, device=device) * (n // (2 * batch))
    return (torch.arange(n, device=device) >= n - lengths[:, None])[:, None, None, :]


class AttentionStub(torch.nn.Module):
    """What Transformers' attention functions read of a Llama attention module (no weights)."""

    is_causal = True
    layer_idx = 0

    def __init__(self, groups: int, d: int, config: DistrConfig | None):
        super().__init__()
        self.num_key_value_groups, self.scaling, self.distr_config = groups, d**-0.5, config


def layer_call(name: str, q, layer, setting=None):
    """One decode-layer attention call through Transformers' attention interface, for ``"sdpa"`` or
    ``"distr-G1"`` (its ``setting``; else ``None``), on the filled cache ``layer``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..integration import distr_attention_forward

    forward = {"sdpa": sdpa_attention_forward, "distr-G1": distr_attention_forward}.get(name)
    if forward is None:
        return None
    config = setting if isinstance(setting, DistrConfig) else None
    module = AttentionStub(q.shape[1] // layer.keys.shape[1], q.shape[-1], config).eval()
    return lambda: forward(module, q, layer.keys, layer.values, None, scaling=module.scaling)


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


@contextlib.contextmanager
def programs_per_sm(count: int | None):
    """Our split-KV kernel cut into splits for ``count`` programs per multiprocessor inside, whatever the keys'
    width (``None``: the kernel's own counts, :data:`hf_distrattn.kernels.decode.PROGRAMS_PER_SM` and
    ``NARROW_PROGRAMS_PER_SM``)."""
    default = decode.PROGRAMS_PER_SM, decode.NARROW_PROGRAMS_PER_SM
    decode.PROGRAMS_PER_SM, decode.NARROW_PROGRAMS_PER_SM = default if count is None else (count, count)
    decode.split_keys.cache_clear()
    try:
        yield
    finally:
        decode.PROGRAMS_PER_SM, decode.NARROW_PROGRAMS_PER_SM = default
        decode.split_keys.cache_clear()


def bench(cache_lens, head_dims, groups, batch=1, heads=(32, 8), block_size=64, sm_counts=(None,),
          ragged=False):
    """The rows; ``sm_counts``: our kernels once per programs-per-multiprocessor count (``None``: the default),
    labelled ``@N/SM`` where given; ``ragged``: every side gets :func:`ragged_mask`, a batch of sequences of
    different lengths (all ``n`` slots are still read: ``bytes`` stays that of the whole cache)."""
    rows = []
    for d in head_dims:
        for n in cache_lens:
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q = torch.randn(batch, heads[0], 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, heads[1], n, d, device="cuda", generator=g, dtype=torch.bfloat16)
                    for _ in range(2))
            kv_bytes = 2 * k.numel() * k.element_size()
            mask = ragged_mask(batch, n, q.device) if ragged else None
            cases = {"sdpa": (None, kv_bytes, None)}
            cases |= {f"sdpa-{name}": (name, kv_bytes, None) for name in ("flash", "cudnn", "efficient")}
            for count in sm_counts:
                tag = "" if count is None else f"@{count}/SM"
                cases["distr-G1" + tag] = (DistrConfig(group_size=1, backend="triton"), kv_bytes, count)
                for group in groups:
                    config = DistrConfig(group_size=group, block_size=block_size, grouping="lsh", sampled="k",
                                         backend="triton")
                    reduced = batch * heads[1] * n * (d // group) * 2 + n // block_size * batch * heads[1] * d * 8
                    cases[f"distr-G{group}-k" + tag] = (config, reduced + kv_bytes // 2, count)
            for name, (setting, nbytes, count) in cases.items():
                row = {"method": name, "d": d, "cache": n, "batch": batch, "heads": list(heads), "bytes": nbytes,
                       "ragged": mask is not None}
                try:
                    with programs_per_sm(count):
                        if isinstance(setting, DistrConfig):
                            fn, call, layer = _step(q, k, v, setting, partial(_distr, config=setting, mask=mask))
                        else:
                            attend = _sdpa(q, k, v, setting, mask)
                            fn, call, layer = _step(q, k, v, setting,
                                                    lambda q, keys, values, _, attend=attend: attend(q, keys, values))
                        row["us"] = median_ms(fn) * 1000
                        row["host_us"], row["call_host_us"] = host_us(fn), host_us(call)
                        layer_fn = None if mask is not None else layer_call(name.partition("@")[0], q, layer,
                                                                             setting)
                        if layer_fn is not None:
                            row["layer_host_us"] = host_us(layer_fn)
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
    layers = []  # (d, cached, sdpa's and distr's decode-layer host µs)
    lines = ["Decode step (cache update + attention), µs: eager calls / CUDA graph (graph speed-up over sdpa's) "
             "[host µs of the attention call]", "",
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
            cells.append(cell + f" [{r['call_host_us']:.0f}]")
        lines.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
        if "layer_host_us" in by.get("sdpa", {}) and "layer_host_us" in by.get("distr-G1", {}):
            layers.append((d, n, by["sdpa"]["layer_host_us"], by["distr-G1"]["layer_host_us"]))
    if layers:
        lines += ["", "Eager host µs of one exact decode-layer call through Transformers' attention interface", "",
                  "| d | cached tokens | sdpa_attention_forward | distr_attention_forward (G=1) | ratio |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {d} | {n} | {sdpa:.1f} | {distr:.1f} | {distr / sdpa:.2f}× |" for d, n, sdpa, distr in layers]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ragged", action="store_true",
                        help="sequences of different lengths (a left-padded static cache's mask); batch 1: a mask "
                        "that keeps every slot")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", metavar="N",
                        help="our kernels once per count of split-KV programs per multiprocessor, rows labelled "
                        "@N/SM (default: once, at the kernel's own count)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = bench(args.cache_lens, args.head_dims, args.groups, args.batch, sm_counts=args.programs_per_sm or (None,),
                 ragged=args.ragged)
    shape = f"batch {args.batch}" + ((", sequences of different lengths (masked)" if args.batch > 1 else
                                       ", masked (every slot kept)") if args.ragged else "")
    write_results(args.json, args.markdown, f"bf16 decode, {shape}", rows, markdown(rows))


if __name__ == "__main__":
    main()
