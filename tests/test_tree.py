"""Tree attention on 2 and 4 gloo processes against single-process attention."""

import datetime
import gc
import tempfile
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_distrattn import DistrConfig, distr_attention
from hf_distrattn.tree import MERGES, ShardedCache, attach, tree_attention


def _run(world_size: int, fn, *args, timeout_s: float = 60):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, f"file://{tmp}/rendezvous", fn, args, timeout_s), nprocs=world_size,
                 join=True)


def _worker(rank, world_size, init, fn, args, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
    gc.collect()
    # nothing, a compiled graph included, keeps the group (and gloo's threads) alive past its destruction: one that
    # lives until the interpreter's exit can abort it there
    assert group() is None, "the process group outlived destroy_process_group"


def _shapes_cases(rank, world, cases):
    for sizes, n_q, group_size in cases:
        _shapes_case(rank, sizes, n_q, group_size, compiled=False)
    if world == 2:
        _shapes_case(rank, *cases[0], compiled=True)


def _shapes_case(rank, sizes, n_q, group_size, compiled):
    g = torch.Generator().manual_seed(7)
    n_k = sum(sizes)
    q = torch.randn(2, 4, n_q, 32, generator=g)
    k, v = torch.randn(2, 2, n_k, 32, generator=g), torch.randn(2, 2, n_k, 32, generator=g)
    lo = sum(sizes[:rank])
    shard = slice(lo, lo + sizes[rank])
    config = DistrConfig(grouping="lsh", group_size=group_size, block_size=16)
    q_pos = torch.arange(n_k - n_q, n_k)
    ref, ref_lse = distr_attention(q, k, v, causal=True, config=config, return_lse=True)
    step = torch.compile(tree_attention, fullgraph=True, backend="aot_eager") if compiled else tree_attention
    for method in MERGES:
        out, lse = step(q, k[:, :, shard], v[:, :, shard], q_positions=q_pos, k_positions=torch.arange(n_k)[shard],
                        config=config, return_lse=True, method=method, check=not compiled)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world,cases", [
    (2, [([20, 13], 1, 1), ([20, 13], 6, 1), ([1, 40], 3, 2)]),
    (4, [([5, 0, 17, 9], 1, 1), ([5, 0, 17, 9], 7, 1), ([8, 8, 8, 9], 4, 2)]),
])
def test_tree_equals_single_process(world, cases):
    """Uneven and empty shards, decode (q_len 1) and chunks (q_len > 1), GQA, exact and G=2, both merges, and the
    first 2-rank case compiled whole (``fullgraph=True``, the collectives traced): all equal the single-process result
    (the query grouping does not depend on the shard)."""
    _run(world, _shapes_cases, cases)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return LlamaForCausalLM(config).eval()


def _generate_case(rank, world, expected):
    model = _tiny_llama()
    ids = torch.arange(3, 40).remainder(97)[None]
    cache = attach(model, ShardedCache())
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0)
    assert out[0].tolist() == expected
    sizes = cache.shard_sizes[0]  # per-rank KV memory: 1/p of the total, within one token
    assert sum(sizes) == ids.shape[1] + 9 and max(sizes) - min(sizes) <= 1
    assert all(layer.keys.shape[-2] == layer.values.shape[-2] == sizes[rank] for layer in cache.layers)


def test_llama_generation_identical():
    """Greedy generation on 2 ranks equals one process's (4 ranks: test_tree_equals_single_process, as CI has 2
    CPU cores)."""
    model = _tiny_llama()
    ids = torch.arange(3, 40).remainder(97)[None]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    _run(2, _generate_case, expected[0].tolist())


def _bad_cases(rank, world):
    for kind in ("missing", "dtype", "world"):
        _bad_case(rank, kind)


def _bad_case(rank, kind):
    q = torch.randn(1, 2, 1, 16)
    k = v = torch.randn(1, 2, 5, 16)
    expect_world = None
    if kind == "missing" and rank == 1:
        k = v = None
    if kind == "dtype" and rank == 1:
        q, k, v = q.double(), k.double(), v.double()
    if kind == "world":
        expect_world = 3
    with pytest.raises(ValueError, match={"missing": "no KV shard", "dtype": "dtypes", "world": "world sizes"}[kind]):
        tree_attention(q, k, v, world_size=expect_world)


def test_bad_input_raises_on_every_rank():
    """A missing shard, a dtype mismatch or a wrong world size: a ValueError on every rank, not a hang."""
    _run(2, _bad_cases)


STALL_TIMEOUT_S = 2
STALL_CASES = [("gather", False), ("reduce", False), ("gather", True)]  # (merge, compiled)


def _stalled_rank(rank, world):
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    if rank == 1:  # stalls past every collective timeout, then leaves without joining a merge
        time.sleep(len(STALL_CASES) * STALL_TIMEOUT_S + 6)
        return
    for method, compiled in STALL_CASES:
        step = torch.compile(tree_attention, backend="aot_eager") if compiled else tree_attention
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            step(q, k, v, check=False, method=method)
        assert time.monotonic() - start < STALL_TIMEOUT_S + 5, (method, compiled)


def test_a_stalled_rank_makes_the_others_raise_within_the_timeout():
    """A rank that never joins the merge: the others get a RuntimeError by the collective timeout, with either
    merge, eager or compiled, never a hang."""
    _run(2, _stalled_rank, timeout_s=STALL_TIMEOUT_S)


def test_attach_requires_cache_for_tree():
    from hf_distrattn.tree import tree_attention_forward

    with pytest.raises(ValueError, match="attach"):
        tree_attention_forward(torch.nn.Module(), *(torch.randn(1, 2, 3, 8),) * 3, None)

