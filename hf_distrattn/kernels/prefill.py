r"""Fused DistrAttention forward in Triton (FlashAttention-2 style).

Pre-pass (:func:`prepare`, skipped at ``G = 1``): the fused grouping kernel of :mod:`.grouping` gives, per block
of ``BLOCK_M = block_size`` queries, ``U`` ``(B, Hq, Nq_pad, DG)`` and the fuse matrix ``Wt`` ``(DG, D)``
(``Wt[j, c]`` = weight of head-dim column ``c`` in group ``j``: one nonzero per column).

Kernel, one program per (query block, batch·head) in :func:`~.softmax.tile_order`, keys in tiles of ``BLOCK_N``:

    K'ᵀ = Wt · Kᵀ                      (fuse on the tensor cores: DG·D per key)
    S = scale · U K'ᵀ  (+ mask)         (score GEMM, inner size DG = D/G)
    S = c · tanh(S / c)                 (logit softcapping, optional)
    online softmax in base 2, acc += P V                 (exact P·V)

and writes ``out = acc / l`` and ``lse = m + log l`` (natural log). With ``grouping="subspace"`` (``SUBSPACE``) the
keys come reduced instead, ``K̃_c = U_c`` per key block (``F_c = K_cᵀ U_c``), and a tile of block ``c`` scores
``(Q F_c)·K̃_cᵀ``: the query fuse ``Q F_c`` (``BLOCK_M·D·DG``) replaces the key fuse (``BLOCK_N·DG·D``), the
same cost at square tiles; tiles of the first key block, the queries' own and its neighbours are scored exactly
(:func:`_subspace_dot`). Key tiles that every row of the block sees whole skip all masking (the FlashAttention-2
split into off-diagonal and diagonal tiles); tiles outside a causal or sliding window are not visited
(:func:`~.softmax.key_range`). Rows with no visible key give 0 and ``-inf``. At ``G = 1``, ``U = Q`` and there is
no fuse; head dims that are not a power of two are zero-padded there. With causal grouping, query block 0 is
exact: a ``G = 1`` launch of one block beside the ``G`` launch of the others. GQA maps query head ``h`` to key
head ``h // (Hq / Hkv)``; K and V are never repeated.

Offsets: batch and head offsets, and a mask's row offsets, are 64-bit (a dense ``N × N`` mask passes 2³¹ elements
from ``N = 46,341``, a batch of long sequences soon after); a row's offset within one head, ``row · stride``, stays
32-bit, so one (batch, head) slice of ``q``, ``k``, ``v`` or ``out`` must span under 2³¹ elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..grouping import padded_width
from ..plan import sm90_failed, sm90_refusal
from .grouping import reduce_operand
from .launch import cached, cdiv
from .softmax import (
    HEAD_GROUP,
    finish,
    key_range,
    mask_arguments,
    mask_ranges,
    mask_tiles,
    masked_scores,
    online_softmax,
    score_scale,
    scores,
    softcapped,
    subspace_exact,
    tile_order,
    visible,
)


@triton.jit
def _subspace_dot(q, k_base, kr_base, f_base, start_m, start_n, offs_m, offs_n, offs_d, n_q, n_k, sk_n, skr_n,
                  sf_blk, window, MASKED: tl.constexpr, WINDOWED: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, DR: tl.constexpr):
    """``grouping="subspace"``'s ``Q·Kᵀ`` of a key tile in key block ``c``: exact when ``c`` is the first block,
    the queries' own or a neighbour (:func:`~.softmax.subspace_exact`), else ``(Q F_c)·K̃_cᵀ`` at inner size
    ``DR``, and exact on the rows whose sliding window cuts ``c``."""
    c = start_n // BLOCK_SIZE
    in_range = offs_n[None, :] < n_k
    kt_ptrs = k_base + offs_n[None, :] * sk_n + offs_d[:, None]
    if subspace_exact(start_n, start_m, BLOCK_SIZE):
        s = scores(q, tl.load(kt_ptrs, mask=in_range, other=0.0), 1.0, IEEE)
    else:
        offs_r = tl.arange(0, DR)
        f = tl.load(f_base + c * sf_blk + offs_d[:, None] * DR + offs_r[None, :])
        krt = tl.load(kr_base + offs_n[None, :] * skr_n + offs_r[:, None], mask=in_range, other=0.0)
        s = scores(scores(q, f, 1.0, IEEE).to(q.dtype), krt, 1.0, IEEE)
        if WINDOWED and MASKED:
            cut = c * BLOCK_SIZE <= offs_m + (n_k - n_q - window)
            s = tl.where(cut[:, None], scores(q, tl.load(kt_ptrs, mask=in_range, other=0.0), 1.0, IEEE), s)
    return s


@triton.jit
def _tile(acc, l_i, m_i, u, wt, k_base, v_base, mask_base, kr_base, f_base, start_m, start_n, offs_m, n_q, n_k,
          sk_n, sv_n, skr_n, sf_blk, qk_scale, window, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
          WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr,
          FOLD_SCALE: tl.constexpr, SUBSPACE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
          D: tl.constexpr, G: tl.constexpr, DR: tl.constexpr):
    """One key tile: fuse K's groups, scores at inner size DG (``SUBSPACE``: :func:`_subspace_dot`), softcap,
    online-softmax update. MASKED tiles check bounds, causality, the window and the mask; the others are wholly
    visible to every row of the block, and with FOLD_SCALE (never with SOFTCAP) their scale is applied inside the
    exponent's multiply-add (:func:`~.softmax.online_softmax`) instead of as a multiply of its own."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    v_ptrs = v_base + offs_n[:, None] * sv_n + offs_d[None, :]
    if MASKED:
        vt = tl.load(v_ptrs, mask=offs_n[:, None] < n_k, other=0.0)
    else:
        vt = tl.load(v_ptrs)
    if SUBSPACE:
        s = _subspace_dot(u, k_base, kr_base, f_base, start_m, start_n, offs_m, offs_n, offs_d, n_q, n_k, sk_n,
                          skr_n, sf_blk, window, MASKED, WINDOWED, IEEE, BLOCK_SIZE, DR)
    else:
        kt_ptrs = k_base + offs_n[None, :] * sk_n + offs_d[:, None]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < n_k, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
        if G > 1:
            if IEEE:
                kt = tl.dot(wt, kt, input_precision="ieee")
            else:
                kt = tl.dot(wt, kt).to(u.dtype)
        s = scores(u, kt, 1.0, IEEE)
    if FOLD_SCALE and not MASKED:
        s_scale = qk_scale
    else:
        s, _ = softcapped(s * qk_scale, softcap, SOFTCAP)
        s_scale = 1.0
    if MASKED:
        keep = visible(offs_m, offs_n, n_q, n_k, window, CAUSAL, WINDOWED)
        s = masked_scores(s, keep, mask_base + offs_n[None, :], MASK_KIND)
    return online_softmax(acc, l_i, m_i, s, s_scale, vt, IEEE)


@cached
@triton.jit
def _distr_fwd(U, K, V, Wt, KR, F, Mask, Ranges, Out, Lse, scale, window, softcap, first_block, n_tiles, n_q, n_k,
               heads, kv_group, su_b, su_h, su_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sw_b, sw_h, sw_blk, sw_j,
               skr_b, skr_h, skr_n, sf_b, sf_h, sf_blk, sm_b, sm_h, sm_m, sr_b, sr_h, so_b, so_h, so_m, sl_b, sl_h,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
               IEEE: tl.constexpr, FOLD_SCALE: tl.constexpr, SUBSPACE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, G: tl.constexpr, DG: tl.constexpr,
               DR: tl.constexpr):
    rank, bh = tile_order(n_tiles, HEAD_GROUP)
    pid_m = first_block + (n_tiles - 1 - rank if CAUSAL else rank)  # causal: the last block has most keys
    bh = bh.to(tl.int64)  # batch and head offsets in 64 bits (module notes)
    b = bh // heads
    h = bh % heads
    hk = h // kv_group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, DG)
    offs_d = tl.arange(0, D)
    u = tl.load(U + b * su_b + h * su_h + offs_m[:, None] * su_m + offs_g[None, :], mask=offs_m[:, None] < n_q,
                other=0.0)
    wt = u  # unused at G = 1 and with SUBSPACE
    if G > 1 and not SUBSPACE:
        wt = tl.load(Wt + b * sw_b + h * sw_h + pid_m * sw_blk + offs_g[:, None] * sw_j + offs_d[None, :])
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    kr_base = KR + b * skr_b + hk * skr_h
    f_base = F + b * sf_b + hk * sf_h
    mask_base = Mask + b * sm_b + h * sm_h + offs_m.to(tl.int64)[:, None] * sm_m
    qk_scale = score_scale(scale, SOFTCAP)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(pid_m, n_q, n_k, window, Ranges + b * sr_b + h * sr_h + pid_m * 4, CAUSAL,
                                       WINDOWED, MASK_KIND, BLOCK_M, BLOCK_N)
    for start_n in range(lo, mid_lo, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, u, wt, k_base, v_base, mask_base, kr_base, f_base, start_m, start_n,
                              offs_m, n_q, n_k, sk_n, sv_n, skr_n, sf_blk, qk_scale, window, softcap, True, CAUSAL,
                              WINDOWED, SOFTCAP, MASK_KIND, IEEE, FOLD_SCALE, SUBSPACE, BLOCK_M, BLOCK_N, D, G, DR)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, u, wt, k_base, v_base, mask_base, kr_base, f_base, start_m, start_n,
                              offs_m, n_q, n_k, sk_n, sv_n, skr_n, sf_blk, qk_scale, window, softcap, False, CAUSAL,
                              WINDOWED, SOFTCAP, MASK_KIND, IEEE, FOLD_SCALE, SUBSPACE, BLOCK_M, BLOCK_N, D, G, DR)
    for start_n in range(mid_hi, hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, u, wt, k_base, v_base, mask_base, kr_base, f_base, start_m, start_n,
                              offs_m, n_q, n_k, sk_n, sv_n, skr_n, sf_blk, qk_scale, window, softcap, True, CAUSAL,
                              WINDOWED, SOFTCAP, MASK_KIND, IEEE, FOLD_SCALE, SUBSPACE, BLOCK_M, BLOCK_N, D, G, DR)
    out, lse = finish(acc, l_i, m_i)
    row_ok = offs_m < n_q
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + b * sl_b + h * sl_h + offs_m, lse, mask=row_ok)


def launch_params(block_m: int, d: int, group: int, masked: bool = False) -> dict:
    """Key-tile size, warps, pipeline depth and where the score scale goes (from the H100 launch sweeps
    recorded in docs/design.md: variants 6 and 8; head dims above 128 take key tiles of 32, unmeasured). A mask
    tile is one more pipelined operand: the exact 128 × 128 tiles at ``d = 128`` keep two stages with it (three
    need 256 KB of shared memory with Triton 3.6, past the 227 KB of an H100)."""
    fold = dict(fold_scale=group > 1 or d < 128)
    if d > 128:
        return dict(block_n=32, num_warps=8 if block_m >= 128 else 4, num_stages=2) | fold
    if block_m >= 128:
        if group == 1:
            return dict(block_n=128 if d >= 128 else 64, num_warps=8,
                        num_stages=2 if masked and d >= 128 else 3) | fold
        return dict(block_n=64, num_warps=4, num_stages=2 if d >= 128 and group == 2 else 3) | fold
    return dict(block_n=64, num_warps=4, num_stages=3 if block_m == 64 else 2) | fold


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: DistrConfig, causal_grouping: bool = False,
            hashes: torch.Tensor | None = None):
    """The pre-pass: ``(U, K, V, Wt)``. ``G = 1``: Q, K, V as they are (head dim zero-padded to a power of two
    where needed), ``Wt = None``. ``G > 1``: the fused grouping kernel's ``U`` and ``Wt`` (``hashes``:
    :func:`hf_distrattn.grouping.hash_directions`)."""
    d = q.shape[-1]
    if config.group_size == 1:
        d_pad = padded_width(d)
        if d_pad != d:
            q, k, v = (torch.nn.functional.pad(t, (0, d_pad - d)) for t in (q, k, v))
        return q, k, v, None
    u, wt = reduce_operand(q, hashes, config, padded_width(d // config.group_size), causal_grouping)
    return u, k, v, wt


def _launch_ranges(mask, rows: int, n_k: int, block_m: int, block_n: int):
    """The mask's tile ranges for a launch over its first ``rows`` query rows (causal grouping's exact first block
    reads one block of the mask, not all of it)."""
    return mask_ranges(mask_tiles(mask[:, :, :rows], rows, n_k, block_m, block_n), rows, n_k, block_m, block_n)


def distr_attention_triton(q, k, v, *, causal=False, attn_mask=None, scale=None, config: DistrConfig,
                           causal_grouping=False, hashes=None, prepared=None, subspace=None, window=None,
                           softcap=None, portable=False, **launch):
    """Shapes and semantics of :func:`hf_distrattn.reference.attention`; ``attn_mask`` already 4-D; unit-stride
    head dims; the output has ``q``'s layout.

    ``causal_grouping`` (``G > 1``): query block ``b`` is grouped by block ``b − 1``'s rows and the first block
    is exact, computed by a second, ``G = 1`` launch of the kernel into the same output. ``prepared``: the
    output of :func:`prepare` for these inputs, to time the kernel alone; ``launch`` overrides
    :func:`launch_params` (``block_n``, ``num_warps``, ``num_stages``, ``fold_scale``) of the ``G``-launch.
    On a Hopper GPU the calls that :func:`hf_distrattn.plan.sm90_refusal` accepts run the Hopper kernel
    (:mod:`.hopper`) instead, unless ``portable``; should it raise, one warning, and the portable kernel from then on.
    ``subspace``: ``grouping="subspace"``'s ``(K̃, F)`` (:func:`hf_distrattn.kernels.subspace.subspace_reduced`);
    ``Q``, ``K`` and ``V`` then go in whole, key tiles never straddle a key block, and there is one launch.
    """
    batch, heads, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v)):  # 32-bit row offsets (module notes)
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] > 2 ** 31:
            raise ValueError(f"{name} of shape {tuple(t.shape)} and strides {t.stride()}: one (batch, head) slice "
                             "spans over 2³¹ elements, past the kernels' 32-bit row offsets")
    scale = 1 / math.sqrt(d) if scale is None else scale
    u, kk, vv, wt = (q, k, v, None) if subspace is not None else prepared or prepare(q, k, v, config,
                                                                                      causal_grouping, hashes)
    reduced, factors = subspace if subspace is not None else (q, q)  # placeholders, never read
    d_pad = vv.shape[-1]
    # q's layout: Transformers passes a (B, N, H, d) buffer viewed as (B, H, N, d), and transposes the output back
    out = torch.empty_like(q) if d_pad == d else torch.empty(batch, heads, n_q, d_pad, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    wt = out if wt is None else wt  # G = 1: a placeholder, never read
    mask, mask_kind, mask_strides = mask_arguments(attn_mask, out)
    n_blocks = cdiv(n_q, config.block_size)

    sm90 = not portable and subspace is None and sm90_refusal(q, k, v, config.group_size, config.block_size,
                                                              attn_mask is not None, window, softcap) is None

    def run(u, kk, vv, group, first_block, count, params):
        nonlocal sm90
        if sm90:  # its programs take 128 queries: first_block is 0 or config.block_size is 128
            from . import hopper  # Gluon: only where plan.sm90_refusal found it

            rows = first_block * config.block_size
            try:
                hopper.attention(u, kk, vv, wt if group > 1 else None, out, lse, causal=causal, scale=scale,
                                 group_size=group, first_block=rows // 128,
                                 count=cdiv(min(n_q, rows + count * config.block_size) - rows, 128))
                return
            except Exception as error:  # noqa: BLE001 - any failure to build or launch it: the portable kernel
                if q.is_cuda:  # a fault on the device is no build failure: it raises here, not in the fallback
                    torch.cuda.synchronize(q.device)
                sm90 = False
                sm90_failed(error)
        ranges, range_strides = (mask, (0, 0)) if attn_mask is None else _launch_ranges(
            mask, min(n_q, (first_block + count) * config.block_size), n_k, config.block_size, params["block_n"])
        _distr_fwd[(count * batch * heads,)](
            u, kk, vv, wt, reduced, factors, mask, ranges, out, lse, scale, window or 0, softcap or 1.0, first_block,
            count, n_q, n_k, heads, heads // h_kv,
            u.stride(0), u.stride(1), u.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            vv.stride(0), vv.stride(1), vv.stride(2), *wt.stride()[:4],
            reduced.stride(0), reduced.stride(1), reduced.stride(2), factors.stride(0), factors.stride(1),
            factors.stride(2),
            *mask_strides, *range_strides, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(1), CAUSAL=causal, WINDOWED=window is not None, SOFTCAP=softcap is not None, MASK_KIND=mask_kind,
            IEEE=q.dtype == torch.float32, FOLD_SCALE=params["fold_scale"] and softcap is None,
            SUBSPACE=subspace is not None, BLOCK_M=config.block_size,
            BLOCK_N=params["block_n"], D=d_pad, G=group, DG=u.shape[-1], DR=reduced.shape[-1],
            num_warps=params["num_warps"], num_stages=params["num_stages"],
        )

    first_block = int(causal_grouping and config.group_size > 1 and subspace is None)
    if first_block:
        run(q, k, v, 1, 0, 1, launch_params(config.block_size, d, 1, attn_mask is not None))
    if n_blocks > first_block:
        params = launch_params(config.block_size, d, config.group_size, attn_mask is not None) | launch
        if subspace is not None:
            params["block_n"] = min(params["block_n"], config.block_size)
        run(u, kk, vv, config.group_size, first_block, n_blocks - first_block, params)
    return (out if d_pad == d else out[..., :d]), lse
