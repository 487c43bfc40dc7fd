"""Pieces shared by the attention kernels: the mask arguments and the mask's tile ranges, the tile order, the key
range of a query tile, softcapping and masking a score tile, the online softmax.

Positions: query ``i`` of ``n_q`` sits at ``i + n_k − n_q`` (bottom-right, as after a KV cache). ``CAUSAL`` hides
keys after it; ``WINDOWED`` hides keys ``window`` or more positions before it (a sliding window of ``window``
keys, Transformers' ``sliding_window``). ``SOFTCAP`` caps the scaled scores ``a`` at ``c · tanh(a / c)``.
"""

import torch
import triton
import triton.language as tl

from .launch import cached, cdiv

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


@cached
@triton.jit
def _mask_tiles(Mask, Flags, n_q, n_k, heads, sm_b, sm_h, sm_m, n_tiles, ADDITIVE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Flags[b·heads + h, i·n_tiles + j]`` of the mask's tile (query block ``i``, key tile ``j``): 0 no key
    visible, 1 every key in range, visible and (additive) unbiased, so the tile needs no masking, 2 otherwise."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid // n_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid % n_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows[:, None] < n_q
    inside = row_in & (cols[None, :] < n_k)
    ptrs = Mask + bh // heads * sm_b + bh % heads * sm_h + rows.to(tl.int64)[:, None] * sm_m + cols[None, :]
    if ADDITIVE:
        m = tl.load(ptrs, mask=inside, other=float("-inf"))
        seen = m > float("-inf")
        free = m == 0
    else:
        seen = tl.load(ptrs, mask=inside, other=0) != 0
        free = seen
    any_seen = tl.max(seen.to(tl.int32))
    all_free = tl.min(tl.where(row_in, (free & inside).to(tl.int32), 1))  # rows past n_q are never stored
    tl.store(Flags + bh * tl.num_programs(0) + pid, tl.where(all_free == 1, 1, 2 * any_seen).to(tl.int8))


def _runs(flags: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """``(..., 4)`` int32 ``[lo, mid_lo, mid_hi, hi)`` per row of ``flags`` ``(..., tiles)`` in positions (tiles of
    ``block``, capped at ``n``): the tiles from the first to the last with a visible key, and the first run of
    tiles that need no masking (empty at ``hi`` if none)."""
    tiles = flags.shape[-1]
    idx = torch.arange(tiles, device=flags.device, dtype=torch.int32)
    seen, free = flags > 0, flags == 1
    hi = torch.where(seen, idx + 1, 0).amax(-1)
    lo = torch.minimum(torch.where(seen, idx, tiles).amin(-1), hi)
    mid_lo = torch.minimum(torch.where(free, idx, tiles).amin(-1), hi)
    mid_hi = torch.where(~free & (idx >= mid_lo[..., None]), idx, tiles).amin(-1).clamp(mid_lo, hi)
    return (torch.stack([lo, mid_lo, mid_hi, hi], -1) * block).clamp_(max=n).to(torch.int32)


def mask_tiles(mask: torch.Tensor, n_q: int, n_k: int, block_m: int, block_n: int) -> torch.Tensor:
    """The one pass over a 4-D ``mask`` ``(1|B, 1|H, n_q, n_k)`` (its first ``n_q`` rows): int8 flags ``(1|B, 1|H,
    ⌈n_q / block_m⌉, ⌈n_k / block_n⌉)`` of its tiles, as :func:`_mask_tiles` writes them."""
    batch, heads = mask.shape[:2]
    n_m, n_n = cdiv(n_q, block_m), cdiv(n_k, block_n)
    flags = torch.empty(batch, heads, n_m, n_n, device=mask.device, dtype=torch.int8)
    _mask_tiles[(n_m * n_n, batch * heads)](mask, flags, n_q, n_k, heads, *mask.stride()[:3], n_n,
                                           ADDITIVE=mask.dtype != torch.bool, BLOCK_M=block_m, BLOCK_N=block_n)
    return flags


def mask_ranges(flags: torch.Tensor, n_q: int, n_k: int, block_m: int, block_n: int, by_key: bool = False):
    """The tiles a kernel visits, from :func:`mask_tiles`' ``flags`` of the same tiles: ``(ranges, (batch, head)
    strides)``, ``ranges`` ``(1|B, 1|H, ⌈n_q / block_m⌉, 4)`` int32 key positions ``[lo, mid_lo, mid_hi, hi)`` per
    query block (:func:`key_range`), or with ``by_key`` ``(.., ⌈n_k / block_n⌉, 4)`` query positions per key tile.
    A causal mask made dense (as Transformers makes it) so costs half the tiles, as ``causal`` does."""
    ranges = _runs(flags.transpose(-1, -2), block_m, n_q) if by_key else _runs(flags, block_n, n_k)
    ranges = ranges.contiguous()
    return ranges, tuple(0 if ranges.shape[i] == 1 else ranges.stride(i) for i in range(2))


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
def key_range(pid_m, n_q, n_k, window, ranges, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
              MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(lo, mid_lo, mid_hi, hi)`` for query tile ``pid_m``: its rows see keys in ``[lo, hi)`` only, and every
    row sees every key of the tiles in ``[mid_lo, mid_hi)`` (no masking needed there). ``lo`` is a multiple of
    ``BLOCK_N``, ``mid_lo`` and ``mid_hi`` too unless equal to ``hi``. Tiles outside ``[lo, hi)`` are skipped.
    With a mask, ``ranges`` points at this tile's four from :func:`mask_ranges` (:func:`within_mask`)."""
    first = pid_m * BLOCK_M + n_k - n_q  # position of the tile's first row
    lo = 0
    hi = n_k
    mid_lo = 0
    mid_hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, first + BLOCK_M)
        mid_hi = tl.minimum(n_k, first + 1)
    if WINDOWED:
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        mid_lo = tl.minimum(tl.cdiv(tl.maximum(first + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N, hi)
    mid_hi = tl.maximum(tl.maximum(mid_hi, 0) // BLOCK_N * BLOCK_N, mid_lo)
    if MASK_KIND != 0:
        lo, mid_lo, mid_hi, hi = within_mask(lo, mid_lo, mid_hi, hi, ranges)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def within_mask(lo, mid_lo, mid_hi, hi, ranges):
    """``[lo, hi)`` and ``[mid_lo, mid_hi)`` narrowed to the mask's four at ``ranges`` (:func:`mask_ranges`): the
    tiles visited see a key under both, those left unmasked need no masking under either."""
    hi = tl.minimum(hi, tl.load(ranges + 3))
    lo = tl.minimum(tl.maximum(lo, tl.load(ranges)), hi)
    mid_lo = tl.minimum(tl.maximum(tl.maximum(mid_lo, tl.load(ranges + 1)), lo), hi)
    mid_hi = tl.maximum(tl.minimum(tl.minimum(mid_hi, tl.load(ranges + 2)), hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def visible(offs_m, offs_n, n_q, n_k, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """``(rows, cols)`` booleans: key ``offs_n`` is in range and visible to query ``offs_m`` (causality, window)."""
    keep = (offs_n[None, :] < n_k) & (offs_m[:, None] < n_q)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (n_k - n_q))
    if WINDOWED:
        keep = keep & (offs_n[None, :] > offs_m[:, None] + (n_k - n_q - window))
    return keep


@triton.jit
def subspace_exact(start_n, start_m, SUB_BLOCK: tl.constexpr):
    """``grouping="subspace"``: whether a key tile at ``start_n`` is scored exactly for a query tile at ``start_m``
    (both inside one block of ``SUB_BLOCK`` rows): its key block is the first, the queries' own or a neighbour of
    it."""
    c = start_n // SUB_BLOCK
    b = start_m // SUB_BLOCK
    return ((c >= b - 1) & (c <= b + 1)) | (c == 0)


@triton.jit
def score_scale(scale, SOFTCAP: tl.constexpr):
    """The factor on ``Q·Kᵀ`` that gives what :func:`softcapped` takes: natural-log scores when ``SOFTCAP`` (the cap
    works in natural units), else base-2 logits (``log2 e`` folded into the scale)."""
    if SOFTCAP:
        return scale
    return scale * 1.4426950408889634


@triton.jit
def softcapped(a, softcap, SOFTCAP: tl.constexpr):
    """``(s, t)``: base-2 logits ``log2(e) · c · tanh(a / c)`` of the natural-log scores ``a`` and ``t = tanh(a /
    c)`` (for the backward's ``1 − t²``), when ``SOFTCAP``; else ``(a, a)``: the caller's scores are already base-2
    (``log2 e`` folded into the scale). ``tanh x = 1 − 2 / (e^{2x} + 1)``, exact at both ends (no overflow)."""
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(a * (2.8853900817779268 / softcap)) + 1.0)
        return t * (softcap * 1.4426950408889634), t
    return a, a


@triton.jit
def scores(a, bt, qk_scale, IEEE: tl.constexpr):
    """``qk_scale · A Bᵀ`` of two tiles (``bt`` already transposed), float32 IEEE products when ``IEEE``."""
    if IEEE:
        return tl.dot(a, bt, input_precision="ieee") * qk_scale
    return tl.dot(a, bt) * qk_scale


@triton.jit
def mask_entries(mask_ptrs, ok, MASK_KIND: tl.constexpr):
    """The user mask's entries at ``mask_ptrs`` where ``ok`` (0 elsewhere): int8 for a boolean mask (``MASK_KIND``
    1), float32 for an additive one (2); 0 without a mask."""
    if MASK_KIND == 1:
        return tl.load(mask_ptrs, mask=ok, other=0).to(tl.int8)
    elif MASK_KIND == 2:
        return tl.load(mask_ptrs, mask=ok, other=0.0).to(tl.float32)
    else:
        return 0


@triton.jit
def apply_mask(s, keep, entries, MASK_KIND: tl.constexpr):
    """Scores (base-2 logits) with ``keep`` and the user mask's ``entries`` (:func:`mask_entries`) applied: a
    boolean entry 0 hides the key, an additive one is added (in natural-log units, so times ``log2 e``)."""
    if MASK_KIND == 1:
        keep = keep & (entries != 0)
    if MASK_KIND == 2:
        s += entries * 1.4426950408889634
    return tl.where(keep, s, float("-inf"))


@triton.jit
def masked_scores(s, keep, mask_ptrs, MASK_KIND: tl.constexpr):
    """Scores with ``keep`` and the user mask at ``mask_ptrs`` applied, its entries loaded where ``keep``."""
    return apply_mask(s, keep, mask_entries(mask_ptrs, keep, MASK_KIND), MASK_KIND)


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
