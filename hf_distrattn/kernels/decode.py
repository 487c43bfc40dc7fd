r"""Split-KV decode kernel for a few queries against a long KV cache: exact, or reading the keys in reduced form.

Decode reads the whole cache for a handful of queries, so it is bound by memory traffic, and one program per
head leaves most of the GPU idle. Here the keys are cut into ``S`` splits; one program per
(split, batch·KV head) attends the ``rep·Nq`` query rows that share that KV head (GQA packed: K and V are read
once per KV head) over its split, and writes a partial ``o_s`` with its log-sum-exp ``ℓ_s``. The exact merge,

    m = max_s ℓ_s,  o = Σ_s e^{ℓ_s − m} o_s / Σ_s e^{ℓ_s − m},  ℓ = m + log Σ_s e^{ℓ_s − m},

is the same associative combine that tree attention does across GPUs. With ``sampled="k"`` DistrAttention the
keys after the first block come reduced (:mod:`hf_distrattn.cache`): a tile of key block ``j`` scores
``(Wt_j q) · u_s``, so ``d/G`` of each key is read instead of ``d`` (values whole). A sliding window splits only
the keys some query can see; softcapping caps each tile's scores (:func:`~.softmax.softcapped`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .launch import cached, cdiv, next_power_of_2, pdl
from .softmax import (
    apply_mask,
    finish,
    mask_arguments,
    mask_entries,
    online_softmax,
    score_scale,
    scores,
    softcapped,
    visible,
)

PROGRAMS_PER_SM = 2
"""Split-KV programs per multiprocessor for keys read whole or at ``d/G > 16`` columns (docs/design.md D5)."""
NARROW_PROGRAMS_PER_SM = 4
"""The same where keys are read at ``d/G ≤ 16`` columns (``G = 4`` at ``d = 64``): a key tile then carries under
two thirds of an exact tile's bytes, so more programs keep enough loads in flight (H100, batch 1: 27.6 against
28.4 µs at 32k cached tokens, 74.7 against 78.7 at 128k; at ``d/G = 32`` four were slower, docs/design.md D16)."""
LAUNCH = {"num_warps": 4, "num_stages": 3}


@triton.jit
def _mask_tile(mask_ptrs, offs_n, hi, row_ok, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr):
    """The user mask's entries for keys ``offs_n`` below ``hi``, loaded a tile ahead of their use (a byte load
    without a dot, which Triton does not pipeline); one ``(1, BLOCK_N)`` row where every query row of the program
    shares it (``MASK_ROW``: a cache's key mask)."""
    ok = (offs_n < hi)[None, :]
    if not MASK_ROW:
        ok = ok & row_ok[:, None]
    return mask_entries(mask_ptrs + offs_n[None, :], ok, MASK_KIND)


@triton.jit
def _fold(acc, l_i, m_i, s, vt, offs_n, hi, row_ok, i, mvals, n_q, n_k, window, softcap, CAUSAL: tl.constexpr,
          WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
    """Softcap and mask a tile of scores (keys ``offs_n`` below ``hi``; ``mvals`` the mask's entries for them),
    fold it into the running softmax."""
    s, _ = softcapped(s, softcap, SOFTCAP)
    keep = (offs_n < hi)[None, :] & row_ok[:, None] & visible(i, offs_n, n_q, n_k, window, CAUSAL, WINDOWED)
    return online_softmax(acc, l_i, m_i, apply_mask(s, keep, mvals, MASK_KIND), 1.0, vt, IEEE)


@triton.jit
def _fuse_query(q, Grp, W, g_base, offs_d, offs_g, IEEE: tl.constexpr):
    """The queries in key block ``j``'s reduced form, ``q Wt_jᵀ`` ``(BLOCK_M, DG)``, with its fuse matrix
    ``Wt_j[g, c] = W[c]·[Grp[c] = g]`` ``(DG, D)`` built from each column's group and weight."""
    wt = tl.where(tl.load(Grp + g_base + offs_d)[None, :] == offs_g[:, None], tl.load(W + g_base + offs_d)[None, :],
                  0.0).to(q.dtype)
    return scores(q, tl.trans(wt), 1.0, IEEE).to(q.dtype)


@cached
@triton.jit
def _decode_split(Q, K, V, UK, Grp, W, Mask, Part, scale, window, softcap, n_q, n_k, heads_kv, rep, start, chunk,
                  capacity, sm_b, sm_h, sm_m, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                  MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, DG: tl.constexpr, PDL: tl.constexpr):
    """One program per (split, batch·KV head). ``Q``, ``K``, ``V`` ``(B, H, N, D)`` and the reduced keys ``UK``
    ``(B, Hkv, capacity, DG)``, ``Grp``/``W`` ``(B, Hkv, ⌈capacity / BLOCK_N⌉, D)`` contiguous, their strides derived
    here (fewer launch arguments); ``Part`` holds the partial outputs ``(rows, S, D)`` then their log-sum-exps
    ``(rows, S)`` (``rows = B·Hq·Nq``, ``S`` splits). ``PDL`` (:func:`~.launch.pdl`): launched early, it first
    waits for the kernel ahead (the cache update), then lets the merge launch."""
    if PDL:
        gdc_wait()  # the kernel ahead (the cache update) done
        gdc_launch_dependents()
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads_kv
    hk = bh % heads_kv
    rows = tl.arange(0, BLOCK_M)
    r = rows // n_q  # query head within the KV head's group
    i = rows % n_q  # query index
    row_ok = rows < rep * n_q
    h = hk * rep + r
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, DG)
    offs_t = tl.arange(0, BLOCK_N)
    row = (b * heads_kv * rep + h) * n_q + i  # the query row, of B·Hq·Nq
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = score_scale(scale, SOFTCAP)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kv_head = b.to(tl.int64) * heads_kv + hk  # int64: a batch of long caches passes 2³¹ elements
    k_base = K + kv_head * n_k * D
    v_base = V + kv_head * n_k * D
    u_base = UK + kv_head * capacity * DG
    g_base = kv_head * tl.cdiv(capacity, BLOCK_N) * D
    mask_ptrs = Mask + b.to(tl.int64) * sm_b
    if not MASK_ROW:
        mask_ptrs += h[:, None].to(tl.int64) * sm_h + i[:, None] * sm_m
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, n_k)
    # two loops without branches inside, so that their loads pipeline: exact keys (all of them at G = 1, else
    # block 0), then the keys stored reduced
    exact_hi = hi
    if G > 1:
        exact_hi = tl.minimum(hi, BLOCK_N)
    mvals = _mask_tile(mask_ptrs, lo + offs_t, exact_hi, row_ok, MASK_KIND, MASK_ROW)
    for start_n in range(lo, exact_hi, BLOCK_N):
        offs_n = start_n + offs_t
        kt = tl.load(k_base + offs_n[None, :] * D + offs_d[:, None], mask=offs_n[None, :] < hi, other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < hi, other=0.0)
        cur = mvals
        mvals = _mask_tile(mask_ptrs, offs_n + BLOCK_N, exact_hi, row_ok, MASK_KIND, MASK_ROW)
        acc, l_i, m_i = _fold(acc, l_i, m_i, scores(q, kt, qk_scale, IEEE), vt, offs_n, hi, row_ok, i, cur,
                              n_q, n_k, window, softcap, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE)
    if G > 1:  # key block j scores (Wt_j q) · u_s
        first = tl.maximum(lo, BLOCK_N)
        mvals = _mask_tile(mask_ptrs, first + offs_t, hi, row_ok, MASK_KIND, MASK_ROW)
        for start_n in range(first, hi, BLOCK_N):
            offs_n = start_n + offs_t
            uq = _fuse_query(q, Grp, W, g_base + (start_n // BLOCK_N) * D, offs_d, offs_g, IEEE)
            ukt = tl.load(u_base + offs_n[None, :] * DG + offs_g[:, None], mask=offs_n[None, :] < hi, other=0.0)
            vt = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < hi, other=0.0)
            cur = mvals
            mvals = _mask_tile(mask_ptrs, offs_n + BLOCK_N, hi, row_ok, MASK_KIND, MASK_ROW)
            acc, l_i, m_i = _fold(acc, l_i, m_i, scores(uq, ukt, qk_scale, IEEE), vt, offs_n, hi, row_ok, i,
                                  cur, n_q, n_k, window, softcap, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE)
    out, lse = finish(acc, l_i, m_i)
    splits = tl.num_programs(0)
    tl.store(Part + (row[:, None] * splits + split) * D + offs_d[None, :], out, mask=row_ok[:, None])
    n_rows = tl.num_programs(1) * rep * n_q
    tl.store(Part + n_rows * splits * D + row * splits + split, lse, mask=row_ok)


@cached
@triton.jit
def _merge_splits(Part, Out, Lse, splits, S_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """One program per query row (of ``B·Hq·Nq``, contiguous ``Out``): the exact combine of its ``splits``
    partials in ``Part`` (:func:`_decode_split`). ``PDL``: launched early, it first waits for the split grid."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    lse = tl.load(Part + tl.num_programs(0) * splits * D + row * splits + offs_s, mask=offs_s < splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    den = tl.sum(w, 0)
    part = tl.load(Part + (row * splits + offs_s[:, None]) * D + offs_d[None, :], mask=offs_s[:, None] < splits,
                   other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(Out + row * D + offs_d, out.to(Out.dtype.element_ty))
    tl.store(Lse + row, m + tl.log(den))


@functools.lru_cache
def _multiprocessors(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device >= 0 else 4


@functools.lru_cache(maxsize=1024)
def split_keys(batch_heads_kv: int, n_k: int, block_n: int, device: int, splits: int | None = None,
               narrow: bool = False) -> tuple:
    """``(S, chunk)``: ``n_k`` keys cut into ``S`` splits of ``chunk`` keys (a multiple of ``block_n``; the last
    split shorter). Unless ``splits`` is given, enough splits for about :data:`PROGRAMS_PER_SM` programs
    (:data:`NARROW_PROGRAMS_PER_SM` for ``narrow`` keys, read at ``d/G ≤ 16`` columns) per multiprocessor of CUDA
    device ``device`` (``-1``: a CPU under the interpreter), each with at least 4 key tiles. Cached: every layer of
    a decode step asks the same."""
    if splits is None:
        programs = (NARROW_PROGRAMS_PER_SM if narrow else PROGRAMS_PER_SM) * _multiprocessors(device)
        splits = max(1, min(cdiv(programs, batch_heads_kv), cdiv(n_k, 4 * block_n)))
    chunk = cdiv(cdiv(n_k, splits), block_n) * block_n
    return cdiv(n_k, chunk), chunk


def decode_attention(q, k, v, *, causal=False, attn_mask=None, scale=None, reduced=None, window=None,
                     softcap=None, block_n: int = 64, splits=None):
    """Attention for a few queries (``Hq/Hkv · Nq ≤ 128`` rows per KV head); semantics of
    :func:`hf_distrattn.reference.attention`. Head dim a power of two. The kernels address every tensor but the
    mask without strides (Triton's launch costs host time per argument), so ``q``, ``k`` and ``v`` are copied
    where they are not contiguous (every Transformers cache layer's are).

    ``reduced``: ``None`` (exact), or keys in reduced form (``sampled="k"``, causal grouping; the reference is
    :func:`hf_distrattn.reference.reduced_keys_attention`): ``(uk, grp, w, block_size)`` with ``uk``
    ``(B, Hkv, ≥Nk, DG)``, ``grp`` int32 and ``w`` float32 ``(B, Hkv, ≥n_blocks, d)``. Then the key tiles are the
    grouping blocks: block 0 is read from ``k`` (it is exact), every later key from ``uk`` only (``d/G`` of each
    key instead of ``d``). Returns ``out`` contiguous in ``q``'s dtype and ``lse`` ``(B, Hq, Nq)`` float32.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    rep = heads // h_kv
    scale = 1 / math.sqrt(d) if scale is None else scale
    if reduced is None:
        uk = grp = w = k
        group, dg = 1, d
    else:
        *tensors, block_n = reduced
        uk, grp, w = (t.contiguous() for t in tensors)
        group, dg = 2, uk.shape[-1]  # any G > 1: the kernel only needs to know the keys are reduced
    start = 0 if window is None else max(n_k - n_q - window + 1, 0) // block_n * block_n  # row 0's first key
    device = q.get_device()
    early = pdl(device)
    splits, chunk = split_keys(batch * h_kv, n_k - start, block_n, device, splits, dg <= 16)
    part = torch.empty(q.numel() * splits + q.numel() // d * splits, device=q.device, dtype=torch.float32)
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, part)
    mask_row = mask_kind > 0 and mask_strides[1] == 0 and (n_q == 1 or mask_strides[2] == 0)
    _decode_split[(splits, batch * h_kv)](
        q, k, v, uk, grp, w, mask, part, scale, window or 0, softcap or 1.0, n_q, n_k, h_kv, rep, start, chunk,
        uk.shape[2], *mask_strides,
        CAUSAL=causal, WINDOWED=window is not None, SOFTCAP=softcap is not None, MASK_KIND=mask_kind, MASK_ROW=mask_row,
        IEEE=q.dtype == torch.float32, BLOCK_M=max(16, next_power_of_2(rep * n_q)), BLOCK_N=block_n, D=d,
        G=group, DG=dg, PDL=early,
        **LAUNCH, launch_pdl=early,
    )
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    _merge_splits[(batch * heads * n_q,)](part, out, lse, splits, S_PAD=max(2, next_power_of_2(splits)), D=d,
                                          PDL=early, num_warps=4, launch_pdl=early)
    return out, lse
