r"""Tree Attention (Shyam et al., arXiv 2408.04093): exact attention over a KV cache sharded across processes.

Each rank ``r`` holds a contiguous shard ``K_r, V_r`` of every layer's cache and the same queries. It computes
its partial result ``o_r = softmax(S_r) V_r`` and log-sum-exp ``ℓ_r`` (``S_r`` its block of scaled scores)
with :func:`hf_distrattn.distr_attention` (exact, or DistrAttention with any ``G``). Softmax over the union
of the shards is associative:

    m = max_r ℓ_r,   w_r = exp(ℓ_r − m),   o = Σ_r w_r o_r / Σ_r w_r,   ℓ = m + log Σ_r w_r,

so one collective gives every rank the exact output (:func:`merge`): an all-gather of each rank's packed
``[o_r, ℓ_r]`` and the combine computed locally (``"gather"``, ``p·B·H·Nq·(d+1)`` floats received), or the
paper's two all-reduces, a MAX of ``ℓ`` then a SUM of the packed ``[w_r o_r, w_r]`` (``"reduce"``). A collective
takes O(log p) steps (a tree), where Ring Attention passes KV blocks around p times; either payload is independent
of the context length. The collectives are PyTorch's functional ones (``torch.ops._c10d_functional``), which
``torch.compile`` traces as graph nodes and CUDA graphs capture on NCCL.

In Transformers: :class:`ShardedCache` keeps each rank's shard (the prompt split evenly, each later token on
the rank with the shortest shard) with the global position of every cached key; :func:`attach` switches a
model to ``attn_implementation="tree"``, whose attention function masks causally by those positions and
merges across ranks. All ranks run the same model on the same tokens (launch with ``torchrun``).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from transformers import AttentionInterface, DynamicCache

from .api import FLOAT_DTYPES, distr_attention
from .config import EXACT, DistrConfig

NAME = "tree"
MERGES = ("gather", "reduce")


def init_distributed(backend: str | None = None, timeout_s: float = 120.0) -> None:
    """``torch.distributed.init_process_group`` from the ``torchrun`` environment, NCCL on GPUs, gloo on CPU,
    with a collective timeout so that a rank that never arrives raises instead of hanging."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())


def _check_consistent(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, group,
                      world_size: int | None) -> None:
    """Raise the same ValueError on every rank if the ranks disagree (one collective, before the real ones)."""
    def code(t):
        return -1 if t is None else FLOAT_DTYPES.index(t.dtype) if t.dtype in FLOAT_DTYPES else -2

    mine = torch.tensor([
        dist.get_world_size(group) if world_size is None else world_size,
        int(k is not None and v is not None), code(q), code(k), code(v), int(q.is_cuda),
        *q.shape, -1 if k is None else k.shape[1], -1 if k is None else k.shape[-1],
    ], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).cpu()
    problems, size = [], dist.get_world_size(group)
    if (every[:, 0] != size).any():
        problems.append(f"ranks expect world sizes {every[:, 0].tolist()} but the group has {size}")
    if (every[:, 1] == 0).any():
        problems.append(f"ranks {torch.nonzero(every[:, 1] == 0).flatten().tolist()} have no KV shard (k or v is None)")
    if (every[:, 2:] != every[0, 2:]).any(dim=0)[:4].any():
        problems.append(f"dtypes or devices differ between ranks (dtype codes, device: {every[:, 2:6].tolist()})")
    if (every[:, 6:] != every[0, 6:]).any():
        problems.append(f"query or head shapes differ between ranks: {every[:, 6:].tolist()}")
    if problems:
        raise ValueError("tree attention: " + "; ".join(problems))


@torch.compiler.assume_constant_result
def _default_group_name() -> str:
    """The default group's name, a constant to ``torch.compile``: traced, ``dist.group.WORLD`` would enter the graph
    as an object, and the compiled code (kept in this module's globals) would keep the group and gloo's threads
    alive past ``destroy_process_group``, to be torn down at the interpreter's exit, where that can abort."""
    return dist.group.WORLD.group_name


def _collective(name: str, tensor: torch.Tensor, group, *args) -> torch.Tensor:
    """``torch.ops._c10d_functional.<name>(tensor, *args, group)``, waited for."""
    group_name = _default_group_name() if group is None else group.group_name
    functional = torch.ops._c10d_functional
    return functional.wait_tensor(getattr(functional, name)(tensor, *args, group_name))


def combine(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of partials stacked on dim 0: ``outs (p, ..., d)``, float32 ``lses (p, ...)``; a partial
    with ``ℓ = −∞`` (no visible key) weighs 0, a row with none anywhere gives 0 and ``−∞``."""
    m = lses.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)
    den = w.sum(0)
    out = (outs * w[..., None]).sum(0) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out, m + torch.log(den)


def merge(out: torch.Tensor, lse: torch.Tensor, group=None, method: str = "gather"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of per-rank partials ``out (B, H, Nq, d)``, ``lse (B, H, Nq)``; the same result on every rank.

    ``method``: ``"gather"`` (one all-gather, the combine computed locally) or ``"reduce"`` (two all-reduces)."""
    if method == "gather":
        packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1)
        world = dist.get_world_size(group)
        every = _collective("all_gather_into_tensor", packed, group, world).view(world, *packed.shape)
        merged, merged_lse = combine(every[..., :-1], every[..., -1])
        return merged.to(out.dtype), merged_lse
    if method != "reduce":
        raise ValueError(f"method must be one of {MERGES}, got {method!r}")
    m = _collective("all_reduce", lse.float(), group, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # 0 for a rank whose keys are all masked
    packed = _collective("all_reduce", torch.cat([out.float() * w[..., None], w[..., None]], dim=-1), group, "sum")
    den = packed[..., -1:]
    merged = packed[..., :-1] / torch.where(den > 0, den, torch.ones_like(den))
    return merged.to(out.dtype), (m + torch.log(den.squeeze(-1))).float()


def tree_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, *,
                   q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                   scale: float | None = None, config: DistrConfig | None = None, group=None,
                   world_size: int | None = None, check: bool = True, return_lse: bool = False,
                   method: str = "gather"):
    """Attention of the replicated queries ``q (B, Hq, Nq, d)`` over the KV shards ``k, v (B, Hkv, n_r, d)``.

    Causal masking by global positions: ``q_positions (Nq,)`` and ``k_positions (n_r,)`` (key ``j`` visible to
    query ``i`` iff ``k_positions[j] <= q_positions[i]``); without them every key is visible. A shard may be
    empty (``n_r = 0``). ``world_size``: the number of ranks the caller expects. ``check``: first compare
    shapes, dtypes, devices, shards and world size across ranks (one small all-gather and a host sync), so that
    a mismatch raises on every rank instead of hanging in the merge. ``method``: :func:`merge`'s. ``group``: the
    process group (default: the default group). Under ``torch.compile`` an explicit group becomes a graph input,
    which the compiled code keeps alive for the rest of the process; the default group does not.
    """
    if check:
        _check_consistent(q, k, v, group, world_size)
    config = config or EXACT
    if k.shape[2] == 0:
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    else:
        mask = None
        if q_positions is not None and k_positions is not None:
            mask = k_positions[None, :] <= q_positions[:, None]
        out, lse = distr_attention(q, k, v, attn_mask=mask, scale=scale, config=config, return_lse=True,
                                   causal_grouping=mask is not None)
    out, lse = merge(out, lse, group, method)
    return (out, lse) if return_lse else out


class ShardedCache(DynamicCache):
    """A DynamicCache holding only this rank's shard of every layer, with the global position of each key.

    The first update of a layer (the prompt) is split into ``world_size`` contiguous, near-equal pieces; each
    later update goes whole to the rank with the fewest cached tokens (lowest rank on ties), so shards stay
    balanced during decoding. ``get_seq_length`` reports the global length, as generation expects. ``merge``:
    how the attention layers merge the ranks' partials (:func:`merge`).
    """

    def __init__(self, group=None, merge: str = "gather"):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        self.merge = merge
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.global_length: dict[int, int] = {}
        self.shard_sizes: dict[int, list[int]] = {}
        self.key_positions: dict[int, torch.Tensor] = {}
        self.query_positions: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start = self.global_length.get(layer_idx, 0)
        n_new = key_states.shape[-2]
        sizes = self.shard_sizes.setdefault(layer_idx, [0] * self.world_size)
        if start == 0:
            bounds = [n_new * r // self.world_size for r in range(self.world_size + 1)]
        else:
            owner = min(range(self.world_size), key=lambda r: (sizes[r], r))
            bounds = [0] * (owner + 1) + [n_new] * (self.world_size - owner)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        for r in range(self.world_size):
            sizes[r] += bounds[r + 1] - bounds[r]
        positions = torch.arange(start, start + n_new, device=key_states.device)
        self.query_positions[layer_idx] = positions
        old = self.key_positions.get(layer_idx, positions[:0])
        self.key_positions[layer_idx] = torch.cat([old, positions[lo:hi]])
        self.global_length[layer_idx] = start + n_new
        return super().update(key_states[..., lo:hi, :], value_states[..., lo:hi, :], layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.global_length.get(layer_idx, 0)


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """Transformers attention-interface entry for ``"tree"``; needs :func:`attach`'s cache."""
    cache: ShardedCache | None = getattr(module, "tree_cache", None)
    if cache is None:
        raise ValueError("attn_implementation='tree' needs hf_distrattn.tree.attach(model, cache) first")
    if dropout:
        raise ValueError("attn_implementation='tree' is for inference: dropout must be 0")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='tree' does not support {name} (this model's attention uses it)")
    layer = module.layer_idx
    out = tree_attention(query, key, value, q_positions=cache.query_positions[layer],
                         k_positions=cache.key_positions[layer], scale=scaling,
                         config=getattr(module, "distr_config", None), group=cache.group,
                         world_size=cache.world_size, check=layer == 0, method=cache.merge)  # check once a step
    return out.transpose(1, 2).contiguous(), None


def attach(model: torch.nn.Module, cache: ShardedCache) -> ShardedCache:
    """Route ``model``'s attention through tree attention over ``cache``; pass the cache to ``generate``."""
    from .integration import attention_modules

    for module in attention_modules(model):
        if not hasattr(module, "layer_idx"):
            raise ValueError(f"{type(module).__name__} has no layer_idx: tree attention needs a decoder with a cache")
        module.tree_cache = cache
    model.set_attn_implementation(NAME)
    return cache


AttentionInterface.register(NAME, tree_attention_forward)  # on import (hf_distrattn imports this module)
