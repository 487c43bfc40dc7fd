r"""Keys in reduced form, kept beside a KV cache, so that decoding reads ``d/G`` of each key instead of ``d``.

With the keys as the sampled operand (``DistrConfig(sampled="k")``) and the causal grouping, key block ``j``
(``block_size`` rows) is grouped by the rows of block ``j − 1``: per group ``g`` of its columns a unit direction
``v_g``, i.e. a fuse matrix ``Wt_j`` ``(d/G, d)`` with one nonzero per column. Key ``s`` of block ``j ≥ 1`` is
stored as ``u_s = Wt_j k_s`` (``d/G`` numbers) and a query attends it as

    (Wt_j q) · u_s  =  q · (Wt_jᵀ Wt_j k_s)  =  q · k̃_s,

the score the prefill path computes with ``K̃ = K M`` (:mod:`hf_distrattn.grouping`); block 0 is exact and read
from the full cache. ``Wt_j`` is kept as each column's group index and weight (``d`` int32 + ``d`` float32 per
block), so a key costs ``2·d/G + 8·d/block_size`` bytes (bf16) instead of ``2·d``; values are read whole.

The reduced form depends on the keys alone, so it follows the cache as it grows: :meth:`ReducedKeys.update` takes
the layer's whole key cache, assumes its first ``length`` rows are those of the previous call (generation appends
only; a cache that is reordered, as beam search does, or cropped must call :meth:`ReducedKeys.reset`), and
reduces each block once it is complete (one launch of the grouping kernel over the last two blocks, once per
``block_size`` keys); the block being filled is read whole and fused in the decode kernel. Buffers grow by
doubling.
"""

from __future__ import annotations

import torch

from .config import DistrConfig
from .kernels.grouping import group_queries, takes
from .kernels.softmax import padded_width


def compact_fuse(wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fuse matrices ``(..., DG, d)`` (one nonzero per column) -> each column's group and weight ``(..., d)``."""
    group = wt.abs().argmax(dim=-2, keepdim=True)
    return group.squeeze(-2).to(torch.int32), wt.gather(-2, group).squeeze(-2).to(torch.float32)


class ReducedKeys:
    """The reduced keys of one attention layer for :func:`hf_distrattn.kernels.decode.decode_attention`."""

    def __init__(self, config: DistrConfig):
        if config.sampled != "k" or config.exact:
            raise ValueError(f"ReducedKeys needs a DistrConfig with sampled='k' and group_size > 1, got {config}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the keys (call when the cache is reordered or cropped)."""
        self.length = self._grouped = 0
        self._uk = self._group = self._weight = self._shape = None

    def _reserve(self, k: torch.Tensor, blocks: int) -> None:
        """Buffers for ``blocks`` key blocks (doubling); a different batch, head count, dtype or device resets."""
        batch, heads, _, d = k.shape
        block, dg = self.config.block_size, padded_width(d // self.config.group_size)
        shape = (batch, heads, dg, d, k.dtype, k.device)
        if self._uk is not None and self._shape == shape:
            if self._group.shape[2] >= blocks:
                return
            blocks = max(blocks, 2 * self._group.shape[2])
        else:
            self.reset()
        old = (self._uk, self._group, self._weight)
        self._shape = shape
        self._uk = k.new_zeros(batch, heads, blocks * block, dg)
        self._group = torch.zeros(batch, heads, blocks, d, device=k.device, dtype=torch.int32)
        self._weight = torch.zeros(batch, heads, blocks, d, device=k.device, dtype=torch.float32)
        if old[0] is not None:
            for new, previous in zip((self._uk, self._group, self._weight), old, strict=True):
                new[:, :, : previous.shape[2]] = previous

    def update(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Follow the keys ``k`` ``(B, Hkv, N, d)``: reduce every complete block and group the block being
        filled. Returns ``(uk, grp, w, block_size, length)`` for :func:`~hf_distrattn.kernels.decode.decode_attention`;
        keys from ``length`` on are read whole and fused in the kernel, so that the grouping kernel runs once
        per ``block_size`` generated tokens."""
        n = k.shape[2]
        block = self.config.block_size
        complete = n // block * block
        if n < self.length:
            self.length = self._grouped = 0
        self._reserve(k, -(-n // block))
        if complete > self.length or self._grouped < -(-n // block):
            first = max(self.length // block - 1, 0)  # the slice's first block only serves as the next one's source
            u, wt = group_queries(k[:, :, first * block:], self.config, self._uk.shape[-1], causal=True)
            self._uk[:, :, self.length:complete] = u[:, :, self.length - first * block: complete - first * block]
            group, weight = compact_fuse(wt[:, :, 1:])
            self._group[:, :, first + 1: first + 1 + group.shape[2]] = group
            self._weight[:, :, first + 1: first + 1 + group.shape[2]] = weight
            self.length, self._grouped = complete, first + 1 + group.shape[2]
        return self._uk, self._group, self._weight, block, self.length


def reducible(k: torch.Tensor, config: DistrConfig, causal_grouping: bool) -> bool:
    """Whether the keys of this call can be held in reduced form (the grouping kernel's settings)."""
    return config.sampled == "k" and not config.exact and causal_grouping and takes(k, config)
