"""Greedy generation with the KV cache sharded over processes by tree attention (the example script).

    torchrun --nproc-per-node 2 -m hf_distrattn.eval.tree_generate --model PATH_OR_ID --prompt "..." --check
    accelerate launch --num_processes 2 -m hf_distrattn.eval.tree_generate   # the same

Every rank runs the model on the same tokens and keeps only its shard of each layer's cache; attention merges
the shards exactly. Without ``--model`` a small random-weight Llama from ``configs/demo-llama.yaml`` is used.
``--check`` also generates without sharding on rank 0 and reports whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from ..demo import load_config, load_model, prompt_ids
from ..tree import ShardedCache, attach, init_distributed


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--prompt")
    parser.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt to make a long context")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    settings = load_config()
    model, tokenizer = load_model(args.model, settings, device, dtype)
    ids = prompt_ids((args.prompt or settings["prompt"]) * args.prompt_repeat, tokenizer, model.config.vocab_size)
    ids = ids.to(device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=model.config.eos_token_id or 0)
    expected = model.generate(ids, **kwargs) if args.check else None
    cache = attach(model, ShardedCache())
    start = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, **kwargs)
    seconds = time.perf_counter() - start
    shard = cache.shard_sizes[0][rank]
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([shard], device=device))
    if rank == 0:
        print(f"{world} ranks, prompt {ids.shape[1]} tokens, cache shards {[int(s) for s in sizes]} tokens, "
              f"{args.new_tokens} new tokens in {seconds:.2f} s")
        if tokenizer is not None:
            print(tokenizer.decode(out[0, ids.shape[1]:]))
        if expected is not None:
            same = torch.equal(out, expected)
            print(f"identical to unsharded generation: {same}")
            if not same:
                raise SystemExit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
