"""Per-layer decode latency of tree attention against a ring baseline and one GPU (launch with torchrun).

Llama-3.1-8B attention: 32 query / 8 KV heads, head_dim 128, bf16, one query token, the KV cache of
``--tokens`` total positions split evenly over the ranks. Per setting, medians over ``--reps`` steps:

- ``tree-gather`` / ``tree-reduce``: local partial (our exact decode kernel) + :func:`hf_distrattn.tree.merge`'s
  one all-gather of the packed ``[o, ℓ]`` / two all-reduces (MAX, then SUM); ``tree+check`` adds the cross-rank
  consistency check that the model path runs once per step;
- ``ring``: Ring Attention's pass, the baseline: p-1 steps, each sending the KV block in hand to the next rank
  (``torch.distributed`` isend/irecv) while attending to it, online-softmax accumulation; every rank ends with
  the output, as in tree;
- ``single``: rank 0 alone over the whole cache, where it fits.

Reports time, the payload each rank contributes per step and peak GPU memory per rank.

    torchrun --nproc-per-node 2 -m hf_distrattn.eval.bench_tree --tokens 131072 524288 1048576 --json tree.json
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
import torch.distributed as dist

from ..kernels.decode import decode_attention
from ..tree import combine, init_distributed, tree_attention
from .common import cuda_ms, write_results

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def ring_step(q, k, v):
    """Ring Attention for one decode step: rotate KV blocks p-1 times, attend to each, merge online."""
    rank, world = dist.get_rank(), dist.get_world_size()
    acc = lse_run = None
    block_k, block_v = k, v
    for step in range(world):
        if step < world - 1:
            recv_k, recv_v = torch.empty_like(block_k), torch.empty_like(block_v)
            nxt, prev = (rank + 1) % world, (rank - 1) % world
            ops = [dist.P2POp(dist.isend, block_k, nxt), dist.P2POp(dist.isend, block_v, nxt),
                   dist.P2POp(dist.irecv, recv_k, prev), dist.P2POp(dist.irecv, recv_v, prev)]
            requests = dist.batch_isend_irecv(ops)
        out, lse = decode_attention(q, block_k, block_v)
        if acc is None:
            acc, lse_run = out.float(), lse
        else:  # fold the arriving block's (out, lse) into the running normalised pair
            acc, lse_run = combine(torch.stack([acc, out.float()]), torch.stack([lse_run, lse]))
        if step < world - 1:
            for request in requests:
                request.wait()
            block_k, block_v = recv_k, recv_v
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for total in args.tokens:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
        local = total // world
        k = torch.randn(1, KV_HEADS, local, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        shard_bytes = 2 * k.numel() * k.element_size()
        packed = 4 * HEADS * (HEAD_DIM + 1)  # float32 [o, ℓ] or [w·o, w] per rank
        for name, fn, sent in [
            # the cross-rank check runs once per model step (layer 0), not per layer, so it is timed apart
            ("tree-gather", partial(tree_attention, q, k, v, check=False, method="gather"), packed),
            ("tree-reduce", partial(tree_attention, q, k, v, check=False, method="reduce"), 4 * HEADS + packed),
            ("tree+check", partial(tree_attention, q, k, v), 8 * 12 * world + packed),
            ("ring", partial(ring_step, q, k, v), (world - 1) * shard_bytes),
        ]:
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_ms(fn, args.reps, warmup=3, before=dist.barrier)
            rows.append({"method": name, "gpus": world, "tokens": total, "ms": ms, "bytes_sent_per_rank": sent,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        # exactness of both against each other on this data
        diff = (tree_attention(q, k, v).float() - ring_step(q, k, v)).abs().max().item()
        rows[-1]["max_abs_diff_vs_tree"] = diff
        del k, v
        torch.cuda.empty_cache()
        if rank == 0:
            torch.cuda.reset_peak_memory_stats()
            try:
                k = torch.randn(1, KV_HEADS, total, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
                v = torch.randn_like(k)
                ms = cuda_ms(partial(decode_attention, q, k, v), args.reps, warmup=3)
                rows.append({"method": "single", "gpus": 1, "tokens": total, "ms": ms, "bytes_sent_per_rank": 0,
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
                del k, v
            except torch.cuda.OutOfMemoryError:
                rows.append({"method": "single", "gpus": 1, "tokens": total, "error": "out of memory"})
            torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        write_results(args.json, None, "bf16", rows, markdown(rows), world_size=world)
    dist.destroy_process_group()


def markdown(rows) -> str:
    lines = ["| tokens | method | GPUs | ms per layer-step | payload bytes / rank | peak GiB / GPU |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['tokens']} | {r['method']} | {r['gpus']} | {r['ms']:.3f} | "
                         f"{r['bytes_sent_per_rank']:,} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
