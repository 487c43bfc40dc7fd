"""Pieces shared by the attention kernels: the mask arguments, the tile order, masking a score tile, the online
softmax."""

import torch
import triton
import triton.language as tl

HEAD_GROUP = tl.constexpr(8)
"""Heads per group in :func:`tile_order`."""


def mask_arguments(attn_mask: torch.Tensor | None, placeholder: torch.Tensor):
    """``(tensor, MASK_KIND, (batch, head, query) strides)`` for a 4-D mask: kind 0 none (``placeholder`` is
    passed and never read), 1 boolean, 2 additive; broadcast dims get stride 0, keys must be contiguous."""
    if attn_mask is None:
        return placeholder, 0, (0, 0, 0)
    mask = attn_mask if attn_mask.stride(-1) == 1 else attn_mask.contiguous()
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(3))
    return mask, 1 if mask.dtype == torch.bool else 2, strides


@triton.jit
def tile_order(n_tiles, GROUP: tl.constexpr):
    """``(rank, head)`` of this program in a 1-D grid of ``n_tiles`` tiles per head: heads in groups of
    ``GROUP``, and within a group rank ``r`` of every head before rank ``r + 1``. Callers map rank 0 to their
    longest tile (causal work per tile grows or shrinks linearly), so the longest programs start first and short
    ones fill the last wave (longest-first list scheduling; the per-head order left one head's longest
    tiles for the end), while the heads that run at one time stay few enough to share their K/V in L2."""
    pid = tl.program_id(0)
    n_heads = tl.num_programs(0) // n_tiles
    first = pid // (GROUP * n_tiles) * GROUP
    size = tl.minimum(GROUP, n_heads - first)
    r = pid - first * n_tiles
    return r // size, first + r % size


@triton.jit
def key_range(pid_m, n_q, n_k, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """``(full, hi)`` for query tile ``pid_m``: key tiles below ``full`` are visible to every row of the tile (no
    masking needed), keys from ``hi`` on to none (causal, queries aligned to the last ``n_q`` keys)."""
    hi = n_k
    full = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, (pid_m + 1) * BLOCK_M + n_k - n_q)
        full = tl.minimum(n_k, pid_m * BLOCK_M + n_k - n_q + 1)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    if MASK_KIND != 0:
        full = 0
    return full, hi


@triton.jit
def scores(a, bt, qk_scale, IEEE: tl.constexpr):
    """``qk_scale · A Bᵀ`` of two tiles (``bt`` already transposed), float32 IEEE products when ``IEEE``."""
    if IEEE:
        return tl.dot(a, bt, input_precision="ieee") * qk_scale
    return tl.dot(a, bt) * qk_scale


@triton.jit
def masked_scores(s, keep, mask_ptrs, MASK_KIND: tl.constexpr):
    """Scores (base-2 logits) with ``keep`` and the user mask applied: ``MASK_KIND`` 1 boolean, 2 additive."""
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=keep, other=0) != 0)
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def online_softmax(acc, l_i, m_i, s, s_scale, vt, IEEE: tl.constexpr):
    """Fold a tile of base-2 scores ``s·s_scale`` and its values ``vt`` into the running ``(acc, l, m)``; rows
    with no visible key so far keep ``m = -inf`` and contribute nothing (no NaN). The scale is applied in the
    exponent's one fused multiply-add, ``2^(s·s_scale − m)``, not as a pass of its own."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(tl.fma(s, s_scale, -m_use[:, None]))
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return acc, l_i, m_new


@triton.jit
def finish(acc, l_i, m_i):
    """``(out, lse)`` from the running state; lse in natural log, ``-inf`` (and out 0) for empty rows."""
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, (m_i + tl.math.log2(safe_l)) / 1.4426950408889634, float("-inf"))
    return acc / safe_l[:, None], lse
