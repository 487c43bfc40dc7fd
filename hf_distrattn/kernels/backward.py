r"""Attention backward in Triton (FlashAttention-2 style), for ``out = softmax(S) V``, ``S = scale · Q Kᵀ + mask``
(or ``c · tanh(scale · Q Kᵀ / c) + mask`` with logit softcapping; causality and a sliding window as masks).

The training path (the ``"projected"`` path of :func:`hf_distrattn.ops.attention`) calls it with ``Q̃`` in place of
``Q`` (or ``K̃`` of ``K``): the approximation is a differentiable map of one operand, attention on the result is
exact, so its backward is the exact one. With the forward's float32 log-sum-exp ``L`` and ``Δ = rowsum(dO ∘ O)``,
each tile recomputes its probabilities instead of storing ``P``:

    P = exp(S − L)                           dV = Pᵀ dO
    dP = dO Vᵀ                               dS = P ∘ (dP − Δ)  (∘ (1 − T²), T = tanh(scale · Q Kᵀ / c))
    dQ = scale · dS K                        dK = scale · dSᵀ Q

where a gradient ``dL`` that reaches the log-sum-exp (attention sinks use it) enters as ``Δ = rowsum(dO ∘ O) − dL``
(``∂L/∂S = P``).

Two kernels, so that every output is written by exactly one program (no atomics): ``_dq`` runs one program per
(query tile, batch·query head) over the key tiles and also writes its rows' ``Δ`` and base-2 log-sum-exp (it
holds their ``dO`` tile already); ``_dkdv``, launched after it, runs one program per (key tile, batch·KV head)
over every query tile of the KV head's ``Hq/Hkv`` query heads (GQA sums there). Both launch their programs
longest first (:func:`~.softmax.tile_order`). Rows beyond the sequence read zeros and contribute nothing; fully
masked rows (``L = −∞``) give ``P = 0``; only tiles on the causal diagonal or a window's edge and user masks are
masked (the forward's split), and tiles outside the window are not visited. Head dims that are not a power of two
are zero-padded. When ``Q̃ = X M`` per grouping block (``M = Wtᵀ Wt``), ``_dq`` writes ``dX = dQ̃ M`` instead of
``dQ̃`` (:func:`_project_tile` in its epilogue, one ``Wt`` per grouping block the tile covers); the same for ``K̃``
in ``_dkdv``. With ``grouping="subspace"`` (``SUB_BLOCK``) a pair scores ``K`` in the first key block, the
query's own and its neighbours (:func:`~.softmax.subspace_exact`) and ``K̃_c = U_c U_cᵀ K_c`` elsewhere: both
kernels read the one their tile's pair needs, and ``_dkdv`` writes ``dK̃`` apart (the caller adds
``U_c U_cᵀ dK̃_c``).

Cost: seven ``d``-deep GEMMs per score (``_dkdv``: recompute, dP, dV, dK; ``_dq``: recompute, dP, dQ), against
FlashAttention-2's five with a float32 ``dQ`` accumulated by atomics (slower in Triton by public reports).
Recomputing the scores in the reduced ``d/G`` form would need the per-query-block key fuse inside ``_dkdv`` for
every (key, query) tile pair, ``d²/G`` MACs per key row per query tile, which at ``BLOCK = 64`` costs what it
saves at ``G = 2`` (see docs/design.md), so the backward works on ``Q̃`` directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grouping import padded_width
from .grouping import project_block
from .launch import cached, cdiv
from .softmax import (
    HEAD_GROUP,
    key_range,
    mask_arguments,
    mask_ranges,
    mask_tiles,
    masked_scores,
    score_scale,
    scores,
    softcapped,
    subspace_exact,
    tile_order,
    visible,
    within_mask,
)


@triton.jit
def _probs_t(x, yt_or_y, lse2, mask_base, offs_m, offs_n, n_q, n_k, qk_scale, window, softcap,
             TRANSPOSED: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
             SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
    """Recomputed probabilities and the softcap's ``T`` (:func:`~.softmax.softcapped`): ``Pᵀ`` ``(BLOCK_N,
    BLOCK_M)`` if ``TRANSPOSED`` (``x`` = key tile, second argument the query tile transposed), else ``P``
    ``(BLOCK_M, BLOCK_N)``."""
    s, t = softcapped(scores(x, yt_or_y, qk_scale, IEEE), softcap, SOFTCAP)
    if TRANSPOSED:
        if MASKED:
            keep = tl.trans(visible(offs_m, offs_n, n_q, n_k, window, CAUSAL, WINDOWED))
            s = masked_scores(s, keep, mask_base + offs_n[:, None], MASK_KIND)
        p = tl.math.exp2(s - lse2[None, :])
    else:  # an explicit branch: code after a return under a constexpr `if` is still built (non-square tiles)
        if MASKED:
            keep = visible(offs_m, offs_n, n_q, n_k, window, CAUSAL, WINDOWED)
            s = masked_scores(s, keep, mask_base + offs_n[None, :], MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])
    return p, t


@triton.jit
def _project_tile(x, wt_base, first, n, IEEE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                  PROJECT_BLOCK: tl.constexpr, PROJECT_CAUSAL: tl.constexpr, DG_PAD: tl.constexpr):
    """``X M_g`` in float32 for the tile's rows ``first ..``, each with its grouping block ``g``'s projection
    ``M_g = Wt_gᵀ Wt_g`` (``wt_base``: the head's ``(n_blocks, DG_PAD, D)`` fuse matrices, contiguous): a tile
    lies in one grouping block or spans several (one pair of products each); ``x`` in the storage dtype."""
    rows = first + tl.arange(0, BLOCK)
    offs = tl.arange(0, DG_PAD)[:, None] * D + tl.arange(0, D)[None, :]
    y = tl.zeros([BLOCK, D], tl.float32)
    for start in tl.static_range(0, BLOCK, PROJECT_BLOCK):
        g = (first + start) // PROJECT_BLOCK
        wt = tl.load(wt_base + tl.minimum(g, (n - 1) // PROJECT_BLOCK) * (DG_PAD * D) + offs)  # rows ≥ n: unused
        if IEEE:
            xm = project_block(x, wt, g, PROJECT_CAUSAL, "ieee")
        else:
            xm = project_block(x, wt, g, PROJECT_CAUSAL, "tf32")
        y = tl.where((rows // PROJECT_BLOCK == g)[:, None], xm, y)
    return y


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, offs_n, n_q, n_k,
               sq_m, sdo_m, sm_m, qk_scale, window, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, D: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < n_q
    qt = tl.load(q_base + offs_m[None, :] * sq_m + offs_d[:, None], mask=rows[None, :], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdo_m + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse2 = tl.load(lse_base + offs_m, mask=rows, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
    pt, tt = _probs_t(k, qt, lse2, mask_base + offs_m.to(tl.int64)[None, :] * sm_m, offs_m, offs_n, n_q, n_k, qk_scale,
                      window, softcap, True, MASKED, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE)
    if IEEE:
        dv += tl.dot(pt, do, input_precision="ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
    else:
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tt * tt)
    if IEEE:
        dk += tl.dot(dst, tl.trans(qt), input_precision="ieee")
    else:
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.jit
def _dkdv_pair(dk, dv, dk_red, k, v, k_red, q_base, do_base, lse_base, delta_base, mask_base, start_m, start_n,
               offs_n, n_q, n_k, sq_m, sdo_m, sm_m, qk_scale, window, softcap, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, SUB_BLOCK: tl.constexpr):
    """:func:`_dkdv_tile`, or with ``SUB_BLOCK`` (``grouping="subspace"`` in blocks of that many rows) on ``K̃``
    (``k_red``) into ``dK̃`` (``dk_red``) when the key tile's block is neither the first nor the query tile's."""
    if SUB_BLOCK:
        if subspace_exact(start_n, start_m, SUB_BLOCK):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, offs_n,
                                n_q, n_k, sq_m, sdo_m, sm_m, qk_scale, window, softcap, MASKED, CAUSAL, WINDOWED,
                                SOFTCAP, MASK_KIND, IEEE, BLOCK_M, D)
        else:
            dk_red, dv = _dkdv_tile(dk_red, dv, k_red, v, q_base, do_base, lse_base, delta_base, mask_base, start_m,
                                    offs_n, n_q, n_k, sq_m, sdo_m, sm_m, qk_scale, window, softcap, MASKED, CAUSAL,
                                    WINDOWED, SOFTCAP, MASK_KIND, IEEE, BLOCK_M, D)
    else:
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_m, offs_n, n_q,
                            n_k, sq_m, sdo_m, sm_m, qk_scale, window, softcap, MASKED, CAUSAL, WINDOWED, SOFTCAP,
                            MASK_KIND, IEEE, BLOCK_M, D)
    return dk, dv, dk_red


@cached
@triton.jit
def _dkdv(Q, K, V, DO, Lse, Delta, Mask, Ranges, DK, DV, Wt, KR, DKR, scale, window, softcap, n_q, n_k, heads,
          kv_group, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m, sl_b, sl_h,
          sm_b, sm_h, sm_m, sr_b, sr_h, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
          CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
          IEEE: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
          PROJECT_BLOCK: tl.constexpr, PROJECT_CAUSAL: tl.constexpr, DG_PAD: tl.constexpr,
          SUB_BLOCK: tl.constexpr):
    pid_n, bh = tile_order(tl.cdiv(n_k, BLOCK_N), HEAD_GROUP)  # causal: key tile 0 is seen by most queries
    h_kv = heads // kv_group
    bh = bh.to(tl.int64)  # batch and head offsets in 64 bits (prefill's notes)
    b = bh // h_kv
    hk = bh % h_kv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    cols = offs_n < n_k
    k = tl.load(K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=cols[:, None], other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=cols[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    dk_red = dk
    k_red = k
    if SUB_BLOCK:  # K̃ has K's layout
        k_red = tl.load(KR + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=cols[:, None],
                        other=0.0)
    qk_scale = score_scale(scale, SOFTCAP)
    # query tiles in [lo, hi) see some of these keys, those in [mid_lo, mid_hi) all of them
    lo = 0
    hi = n_q
    mid_lo = 0
    mid_hi = n_q
    if CAUSAL:
        lo = tl.maximum(start_n - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
        mid_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (n_k - n_q), 0), BLOCK_M) * BLOCK_M
    if WINDOWED:  # query i sees key j when i + n_k − n_q − j < window
        hi = tl.minimum(n_q, start_n + BLOCK_N - 1 + window - (n_k - n_q))
        mid_hi = tl.maximum(start_n + window - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi), mid_lo)
    for r in range(0, kv_group):
        h = hk * kv_group + r
        q_lo, q_mid_lo, q_mid_hi, q_hi = lo, mid_lo, mid_hi, hi
        if MASK_KIND != 0:  # the query tiles that see these keys under this head's mask
            q_lo, q_mid_lo, q_mid_hi, q_hi = within_mask(lo, mid_lo, mid_hi, hi,
                                                         Ranges + b * sr_b + h * sr_h + pid_n * 4)
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        lse_base = Lse + b * sl_b + h * sl_h
        delta_base = Delta + b * sl_b + h * sl_h
        mask_base = Mask + b * sm_b + h * sm_h
        for start_m in range(q_lo, q_mid_lo, BLOCK_M):
            dk, dv, dk_red = _dkdv_pair(dk, dv, dk_red, k, v, k_red, q_base, do_base, lse_base, delta_base,
                                        mask_base, start_m, start_n, offs_n, n_q, n_k, sq_m, sdo_m, sm_m, qk_scale,
                                        window, softcap, True, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE, BLOCK_M,
                                        D, SUB_BLOCK)
        for start_m in range(q_mid_lo, q_mid_hi, BLOCK_M):
            dk, dv, dk_red = _dkdv_pair(dk, dv, dk_red, k, v, k_red, q_base, do_base, lse_base, delta_base,
                                        mask_base, start_m, start_n, offs_n, n_q, n_k, sq_m, sdo_m, sm_m, qk_scale,
                                        window, softcap, False, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE, BLOCK_M,
                                        D, SUB_BLOCK)
        for start_m in range(q_mid_hi, q_hi, BLOCK_M):
            dk, dv, dk_red = _dkdv_pair(dk, dv, dk_red, k, v, k_red, q_base, do_base, lse_base, delta_base,
                                        mask_base, start_m, start_n, offs_n, n_q, n_k, sq_m, sdo_m, sm_m, qk_scale,
                                        window, softcap, True, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE, BLOCK_M,
                                        D, SUB_BLOCK)
    if SUB_BLOCK:  # dK̃ apart, in K's layout: the caller projects it (dK_c += U_c U_cᵀ dK̃_c)
        tl.store(DKR + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :],
                 (dk_red * scale).to(DKR.dtype.element_ty), mask=cols[:, None])
    dk = (dk * scale).to(DK.dtype.element_ty)
    if PROJECT_BLOCK:  # dK = dK̃ M
        wt_base = Wt + bh.to(tl.int64) * tl.cdiv(n_k, PROJECT_BLOCK) * (DG_PAD * D)
        dk = _project_tile(dk, wt_base, start_n, n_k, IEEE, BLOCK_N, D, PROJECT_BLOCK, PROJECT_CAUSAL,
                           DG_PAD).to(DK.dtype.element_ty)
    tl.store(DK + b * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :], dk, mask=cols[:, None])
    tl.store(DV + b * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=cols[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, kr_base, v_base, mask_base, start_n, start_m, offs_m, n_q, n_k, sk_n,
             sv_n, qk_scale, window, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
             SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
             D: tl.constexpr, SUB_BLOCK: tl.constexpr):
    """One key tile's share of a query tile's ``dQ``; with ``SUB_BLOCK`` (``grouping="subspace"``) the key tile
    is read from ``K̃`` (``kr_base``) unless its block is the first or the query tile's own."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    cols = offs_n < n_k
    kt_offsets = offs_n[None, :] * sk_n + offs_d[:, None]
    if SUB_BLOCK:
        if subspace_exact(start_n, start_m, SUB_BLOCK):
            kt = tl.load(k_base + kt_offsets, mask=cols[None, :], other=0.0)
        else:
            kt = tl.load(kr_base + kt_offsets, mask=cols[None, :], other=0.0)
    else:
        kt = tl.load(k_base + kt_offsets, mask=cols[None, :], other=0.0)
    vt = tl.load(v_base + offs_n[None, :] * sv_n + offs_d[:, None], mask=cols[None, :], other=0.0)
    p, t = _probs_t(q, kt, lse2, mask_base, offs_m, offs_n, n_q, n_k, qk_scale, window, softcap, False, MASKED,
                    CAUSAL, WINDOWED, SOFTCAP, MASK_KIND, IEEE)
    if IEEE:
        dp = tl.dot(do, vt, input_precision="ieee")
    else:
        dp = tl.dot(do, vt)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    if IEEE:
        dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
    else:
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@cached
@triton.jit
def _dq(Q, K, V, DO, Lse, Delta, Lse2, Mask, Ranges, DQ, Wt, KR, Out, DLse, scale, window, softcap, n_q, n_k,
        heads, kv_group, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m, sl_b, sl_h,
        sm_b, sm_h, sm_m, sr_b, sr_h, sdq_b, sdq_h, sdq_m, so_b, so_h, so_m,
        CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DLSE: tl.constexpr,
        MASK_KIND: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        PROJECT_BLOCK: tl.constexpr, PROJECT_CAUSAL: tl.constexpr, DG_PAD: tl.constexpr,
        SUB_BLOCK: tl.constexpr):
    n_tiles = tl.cdiv(n_q, BLOCK_M)
    rank, bh = tile_order(n_tiles, HEAD_GROUP)
    pid_m = n_tiles - 1 - rank if CAUSAL else rank  # causal: the last query tile sees most keys
    bh = bh.to(tl.int64)  # batch and head offsets in 64 bits (prefill's notes)
    b = bh // heads
    h = bh % heads
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < n_q
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    o = tl.load(Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], mask=rows[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # Δ = rowsum(dO ∘ O) − dL
    if HAS_DLSE:
        delta -= tl.load(DLse + bh * n_q + offs_m, mask=rows, other=0.0)
    lse = tl.load(Lse + b * sl_b + h * sl_h + offs_m, mask=rows, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # no visible key: P = 0
    tl.store(Delta + b * sl_b + h * sl_h + offs_m, delta, mask=rows)  # both for _dkdv
    tl.store(Lse2 + b * sl_b + h * sl_h + offs_m, lse2, mask=rows)
    k_base = K + b * sk_b + hk * sk_h
    kr_base = KR + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    mask_base = Mask + b * sm_b + h * sm_h + offs_m.to(tl.int64)[:, None] * sm_m
    qk_scale = score_scale(scale, SOFTCAP)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(pid_m, n_q, n_k, window, Ranges + b * sr_b + h * sr_h + pid_m * 4, CAUSAL,
                                       WINDOWED, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(lo, mid_lo, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, kr_base, v_base, mask_base, start_n, pid_m * BLOCK_M, offs_m,
                      n_q, n_k, sk_n, sv_n, qk_scale, window, softcap, True, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND,
                      IEEE, BLOCK_N, D, SUB_BLOCK)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, kr_base, v_base, mask_base, start_n, pid_m * BLOCK_M, offs_m,
                      n_q, n_k, sk_n, sv_n, qk_scale, window, softcap, False, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND,
                      IEEE, BLOCK_N, D, SUB_BLOCK)
    for start_n in range(mid_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, kr_base, v_base, mask_base, start_n, pid_m * BLOCK_M, offs_m,
                      n_q, n_k, sk_n, sv_n, qk_scale, window, softcap, True, CAUSAL, WINDOWED, SOFTCAP, MASK_KIND,
                      IEEE, BLOCK_N, D, SUB_BLOCK)
    dq = (dq * scale).to(DQ.dtype.element_ty)
    if PROJECT_BLOCK:  # dQ = dQ̃ M
        wt_base = Wt + bh.to(tl.int64) * tl.cdiv(n_q, PROJECT_BLOCK) * (DG_PAD * D)
        dq = _project_tile(dq, wt_base, pid_m * BLOCK_M, n_q, IEEE, BLOCK_M, D, PROJECT_BLOCK, PROJECT_CAUSAL,
                           DG_PAD).to(DQ.dtype.element_ty)
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :], dq, mask=rows[:, None])


def launch_params(d: int, dtype: torch.dtype) -> dict:
    """``{"dkdv": ..., "dq": ...}``: tile sizes (``block_m`` query rows, ``block_n`` keys), warps and stages of
    each kernel. Square tiles of 64 (the H100 sweep in docs/design.md: 3 stages qt d ≤ 64, 2 qt 128); 32 for
    float32 and for head dims above 128 (unmeasured)."""
    if dtype == torch.float32 or d > 128:
        tile = dict(block_m=32, block_n=32, num_warps=4, num_stages=2)
    else:
        tile = dict(block_m=64, block_n=64, num_warps=4, num_stages=3 if d <= 64 else 2)
    return {"dkdv": tile, "dq": tile}


def attention_backward(q, k, v, out, lse, dout, *, causal: bool, attn_mask, scale: float, project=None,
                       subspace=None, window=None, softcap=None, dlse=None, dkdv=None, dq=None):
    """Gradients ``(dQ, dK, dV)`` of ``softmax(scale · Q Kᵀ + mask) V`` (GQA: ``K``, ``V`` have fewer heads), in
    the inputs' dtype (accumulated in float32).

    q, out, dout: ``(batch, Hq, Nq, d)``; k, v: ``(batch, Hkv, Nk, d)``; any strides, a unit-stride last dim for
    ``q``, ``k``, ``v`` (``out``, ``dout`` are copied otherwise); the gradients keep the inputs' layouts. lse:
    float32 ``(batch, Hq, Nq)`` from the forward (natural log), ``dlse`` its gradient (or ``None``); attn_mask 4-D
    or ``None``; ``window``, ``softcap``: as the forward's; ``dkdv`` / ``dq``: dicts that override entries of
    :func:`launch_params` for that kernel.
    ``project = (operand, wt, block, causal)``: ``q`` (operand ``"q"``) or ``k`` (``"k"``) is ``X̃ = X M`` per block
    of ``block`` rows, ``M = Wtᵀ Wt`` from :func:`.grouping.reduce_operand` (``wt`` contiguous; ``causal``: block 0
    has ``M = I``); that gradient is returned as ``dX = dX̃ M`` (``M`` symmetric), in the kernel's epilogue.
    ``subspace = (k_red, dk_red, block)`` (``grouping="subspace"``, as many queries as keys, no window): pairs
    outside the first, the query's own and the neighbouring blocks of ``block`` keys score ``K̃`` (``k_red``,
    ``k``'s layout), and their gradient ``dK̃`` is written to ``dk_red`` (``k``'s layout) instead of ``dK``; tiles
    then never straddle a block.
    """
    batch, heads, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    d_pad = padded_width(d)
    out, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (out, dout))
    lse = lse.contiguous()
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)  # Δ and the base-2 lse: written by _dq for _dkdv
    defaults = launch_params(d_pad, q.dtype)
    p_kv, p_q = defaults["dkdv"] | (dkdv or {}), defaults["dq"] | (dq or {})
    sub_block = 0 if subspace is None else subspace[2]
    if sub_block:
        if d_pad != d or not k.stride() == subspace[0].stride() == subspace[1].stride():
            raise ValueError("subspace needs a power-of-two head dim and K̃, dK̃ in K's layout")
        p_kv, p_q = ({**p, "block_m": min(p["block_m"], sub_block), "block_n": min(p["block_n"], sub_block)}
                     for p in (p_kv, p_q))
    if d_pad != d:
        q, k, v, out, dout = (torch.nn.functional.pad(t, (0, d_pad - d)) for t in (q, k, v, out, dout))
    dq_, dk, dv = (torch.empty_like(t) for t in (q, k, v))  # the inputs' layouts (Transformers' (B, N, H, d) views)
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, dq_)
    common = dict(CAUSAL=causal, WINDOWED=window is not None, SOFTCAP=softcap is not None, MASK_KIND=mask_kind,
                  IEEE=q.dtype == torch.float32, D=d_pad)
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else lse  # lse: a placeholder, never read
    if project is not None and d_pad != d:
        raise ValueError(f"project needs a power-of-two head dim, got {d}")
    wt = dq_ if project is None else project[1]  # dq_: a placeholder pointer, never read
    k_red, dk_red = (k, dk) if subspace is None else subspace[:2]
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride()[:2],
               *mask_strides)

    def launch(params, operand):  # operand: "q" for _dq, "k" for _dkdv
        projected = project is not None and project[0] == operand
        return dict(BLOCK_M=params["block_m"], BLOCK_N=params["block_n"], num_warps=params["num_warps"],
                    num_stages=params["num_stages"], PROJECT_BLOCK=project[2] if projected else 0,
                    PROJECT_CAUSAL=projected and project[3], DG_PAD=wt.shape[-2] if projected else 16,
                    SUB_BLOCK=sub_block) | common

    by_query = by_key = (mask, (0, 0))
    if attn_mask is not None:  # the mask's tiles each kernel visits: one pass over it where their tiles agree
        tiles_q, tiles_kv = ((p["block_m"], p["block_n"]) for p in (p_q, p_kv))
        flags_q = mask_tiles(mask, n_q, n_k, *tiles_q)
        flags_kv = flags_q if tiles_kv == tiles_q else mask_tiles(mask, n_q, n_k, *tiles_kv)
        by_query = mask_ranges(flags_q, n_q, n_k, *tiles_q)
        by_key = mask_ranges(flags_kv, n_q, n_k, *tiles_kv, by_key=True)
    _dq[(cdiv(n_q, p_q["block_m"]) * batch * heads,)](
        q, k, v, dout, lse, delta, lse2, mask, by_query[0], dq_, wt, k_red, out, dlse, scale, window or 0,
        softcap or 1.0, n_q, n_k, heads, heads // h_kv, *strides, *by_query[1], *dq_.stride()[:3], *out.stride()[:3],
        HAS_DLSE=has_dlse, **launch(p_q, "q"))
    _dkdv[(cdiv(n_k, p_kv["block_n"]) * batch * h_kv,)](
        q, k, v, dout, lse2, delta, mask, by_key[0], dk, dv, wt, k_red, dk_red, scale, window or 0, softcap or 1.0,
        n_q, n_k, heads, heads // h_kv, *strides, *by_key[1], *dk.stride()[:3], *dv.stride()[:3],
        **launch(p_kv, "k"))
    if d_pad == d:
        return dq_, dk, dv
    return dq_[..., :d], dk[..., :d], dv[..., :d]
