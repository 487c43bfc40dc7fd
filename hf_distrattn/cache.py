r"""Keys in reduced form, kept in a Transformers cache layer, so that decoding reads ``d/G`` of each key, not ``d``.

With the keys as the sampled operand (``DistrConfig(sampled="k")``) and the causal grouping, key block ``j``
(``block_size`` rows) is grouped by the rows of block ``j − 1``: a fuse matrix ``Wt_j`` ``(d/G × d)`` with one
nonzero per column. Key ``s`` of block ``j ≥ 1`` is stored as ``u_s = Wu_j k_s`` (``d/G`` numbers; ``Wu = Wt``
for rank-1 groups) and a query attends it as

    (Wt_j q) · u_s  =  q · k̃_s,

the score the prefill computes with ``K̃ = K M`` (:mod:`hf_distrattn.grouping`); block 0 is exact and read from
the full cache. ``Wt_j`` is kept as each column's group and weight (``d`` int32 + ``d`` float32 per block), so a
key costs ``2·d/G + 8·d/block_size`` bytes (bf16) instead of ``2·d``; values are read whole.

``u_s`` depends only on key ``s`` and the block before it, which is complete when ``s`` arrives: each update
reduces exactly the keys it writes, at the positions it writes them, grouping a block when its first key arrives
and reading the stored grouping otherwise; no branch on the cache's length runs on the host, so a static cache's
update replays in a CUDA graph. A static layer's update is one launch: the new keys and values written into the
cache and the keys reduced (:func:`hf_distrattn.ops.reduce_keys`).
:class:`ReducedStaticLayer` preallocates everything to ``max_cache_len``; :class:`ReducedDynamicLayer` grows by
doubling. Unfilled slots of a static cache hold zeros and are masked by the attention mask.

``generate`` makes plain ``DynamicLayer``/``StaticLayer`` caches; :func:`reduced_layer` swaps such a layer for
its reduced twin (same key and value tensors) the first time a ``sampled="k"`` layer sees it, in eager mode (the
prefill: Transformers compiles only the decode step). The attention function reaches the cache through the
forward pre-hook that :func:`hf_distrattn.configure` installs (Transformers does not pass the cache to attention
functions).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from . import ops
from .config import DistrConfig
from .grouping import hash_directions, padded_width
from .plan import plan_reduce_keys


class ReducedKeys:
    """What the reduced layers add to a cache layer: ``reduced_keys`` ``(B, H, capacity, width)`` in the keys'
    dtype, ``fuse_group`` int32 and ``fuse_weight`` float32 ``(B, H, capacity_blocks, d)``; ``hashes`` the LSH
    directions, made with them (in eager code: traced, their few dozen integer ops would be compiled into every
    layer's decode step)."""

    config: DistrConfig
    reduced_keys: torch.Tensor | None
    fuse_group: torch.Tensor | None
    fuse_weight: torch.Tensor | None
    hashes: torch.Tensor | None

    @property
    def reduced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reduced_keys, fuse_group, fuse_weight)`` for :func:`hf_distrattn.distr_attention`."""
        return self.reduced_keys, self.fuse_group, self.fuse_weight

    def _allocate(self, keys: torch.Tensor, capacity: int) -> None:
        batch, heads, _, d = keys.shape
        block = self.config.block_size
        width = padded_width(d // self.config.group_size)
        old = (self.reduced_keys, self.fuse_group, self.fuse_weight)
        self.reduced_keys = keys.new_zeros(batch, heads, capacity, width)
        self.fuse_group = torch.zeros(batch, heads, -(-capacity // block), d, device=keys.device, dtype=torch.int32)
        self.fuse_weight = torch.zeros(batch, heads, -(-capacity // block), d, device=keys.device)
        self.hashes = hash_directions(block, self.config.num_hashes, self.config.seed, keys.device)
        for new, previous in zip(self.reduced, old, strict=True):
            if previous is not None:
                new[:, :, : previous.shape[2]] = previous

    def _mark_static(self) -> None:
        """A static layer's tensors keep their addresses, so that CUDA graphs read them in place."""
        for t in (*self.reduced, self.hashes):
            torch._dynamo.mark_static_address(t)

    def _reduce(self, start: torch.Tensor, n_new: int, key_states=None, value_states=None) -> None:
        """Reduce the keys ``start .. start + n_new − 1`` (``start`` a 0-d int64 device tensor): already written,
        or written here from ``key_states``/``value_states`` with the values, in the same launch."""
        config = self.config
        ops.call(ops.reduce_keys, self.keys, self.values, start, self.hashes, *self.reduced, key_states, value_states,
                 n_new, plan_reduce_keys(self.keys, config), *ops.config_args(config))

    def _select_batch(self, select) -> None:
        if self.reduced_keys is not None:
            self.reduced_keys, self.fuse_group, self.fuse_weight = (select(t) for t in self.reduced)


class ReducedDynamicLayer(ReducedKeys, DynamicLayer):
    """A ``DynamicLayer`` that also keeps its keys in reduced form (module notes)."""

    def __init__(self, config: DistrConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.reduced_keys = self.fuse_group = self.fuse_weight = self.hashes = None

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n, n_new = keys.shape[-2], key_states.shape[-2]
        if self.reduced_keys is None or self.reduced_keys.shape[2] < n:
            self._allocate(keys, max(n, 2 * (0 if self.reduced_keys is None else self.reduced_keys.shape[2])))
        self._reduce(torch.full((), n - n_new, device=keys.device, dtype=torch.int64), n_new)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.reduced_keys = self.fuse_group = self.fuse_weight = self.hashes = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_batch(lambda t: t[indices, ...])


class ReducedStaticLayer(ReducedKeys, StaticLayer):
    """A ``StaticLayer`` that also keeps its keys in reduced form, preallocated to ``max_cache_len``."""

    def __init__(self, max_cache_len: int, config: DistrConfig, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.config = config
        self.reduced_keys = self.fuse_group = self.fuse_weight = self.hashes = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._allocate(self.keys, self.max_cache_len)
        if not torch.compiler.is_compiling():
            self._mark_static()

    def update(self, key_states, value_states, *args, **kwargs):
        """``StaticLayer.update`` (new rows at ``cumulative_length``) and the key reduction in one launch, then the
        length's increment: two kernels per step instead of seven."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        self._reduce(self.cumulative_length, n_new, key_states, value_states)
        self.cumulative_length.add_(n_new)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        for t in self.reduced:
            if t is not None:
                t.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))


def _upgrade(layer, config: DistrConfig) -> ReducedKeys:
    """The reduced twin of a plain ``layer``, sharing its tensors, with its keys so far reduced."""
    twin_class = ReducedStaticLayer if isinstance(layer, StaticLayer) else ReducedDynamicLayer
    twin = twin_class.__new__(twin_class)
    twin.__dict__.update(layer.__dict__)
    twin.config = config
    twin.reduced_keys = twin.fuse_group = twin.fuse_weight = twin.hashes = None
    if layer.is_initialized:
        twin._allocate(layer.keys, layer.keys.shape[2])
        if isinstance(twin, StaticLayer):
            twin._mark_static()
        n = int(layer.get_seq_length())
        if n:
            twin._reduce(torch.zeros((), device=layer.keys.device, dtype=torch.int64), n)
    return twin


def reduced_layer(cache, layer_idx: int | None, config: DistrConfig) -> ReducedKeys | None:
    """This layer's reduced-key cache layer, made from the plain one the first time (eager only), or ``None`` where
    keys are not held reduced (``sampled="q"``, ``G = 1``, ``grouping="subspace"``, whose decoding is exact, no
    cache, or a layer kind other than the plain dynamic or static one: sliding windows, quantized or offloaded
    caches)."""
    if cache is None or layer_idx is None or config.exact or config.sampled != "k" or config.grouping == "subspace":
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if isinstance(layer, ReducedKeys):
        if layer.config == config:
            return layer
    elif type(layer) not in (DynamicLayer, StaticLayer):
        return None
    if torch.compiler.is_compiling():
        return None
    layers[layer_idx] = _upgrade(layer, config)
    return layers[layer_idx]
