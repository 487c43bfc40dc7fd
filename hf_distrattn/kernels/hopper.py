r"""DistrAttention forward for Hopper (sm_90) in Gluon: TMA loads, ``wgmma``, warp specialisation.

One program per block of ``BLOCK_M = 2 · 64`` queries of one (batch, head). Three partitions:

* a one-warp **loader** streams the key and value tiles of ``BLOCK_N`` rows by TMA through a ring of ``STAGES``
  shared-memory buffers (an mbarrier pair per buffer and operand: *ready* when the bytes land, *empty* once both
  consumers are done with it); it first loads the two query tiles;
* two **consumer** warpgroups, 64 query rows each (``wgmma``'s M), run the FlashAttention loop in
  FlashAttention-3's order: for key tile ``j`` a warpgroup issues the score GEMM of ``j`` and ``P·V`` of ``j − 1``
  together, in turns with the other warpgroup (an mbarrier pair), then computes the softmax of ``j`` on the CUDA
  cores while its ``P·V`` and the other warpgroup's GEMMs run on the tensor cores. Per key tile, for a
  warpgroup's rows ``i`` and keys ``c``:

      S = U · K̃ᵀ                              (score GEMM, inner size DG = D / G; wgmma, operands in shared memory)
      m' = max(m, rowmax(S)·s),  P = 2^(S·s − m'),  l = l·2^(m − m') + rowsum(P)     (s = scale · log₂e)
      O = O · 2^(m − m') + P V                  (P from registers as bf16/fp16, V in shared memory; exact)

  and finally ``out = O / l``, ``lse = (m + log₂ l) · ln 2``. Masked scores (keys past ``n_k``, causal) are
  ``-inf``; a row that sees no key gives 0 and ``lse = -inf``.

Grouping (``G > 1``): ``U`` comes from the grouping pre-pass (:func:`hf_distrattn.kernels.prefill.prepare`), and
the keys are fused per query block, ``K̃ = K · Wtᵀ`` (``Wt``: ``(DG, D)``, one nonzero per column). Each consumer
computes the half of ``K̃``'s rows of a tile (a wgmma of ``BLOCK_N/2 × D × DG``), stores it to shared memory and
meets the other at a barrier before its score GEMM, so the fuse costs ``BLOCK_N · D · DG`` per tile and program.
Per tile and program the score work is then ``BLOCK_N·DG·(D + BLOCK_M)`` against ``BLOCK_N·D·BLOCK_M`` exact:
at ``BLOCK_M = 128`` the factor ``(D + 128) / (128 · G)``, e.g. 0.75 at ``D=64, G=2`` and 1.0 at ``D=128, G=2``.

Tensors are addressed by 4-D TMA descriptors over ``(B, H, N, D)`` (any strides with a unit last one), so rows past
``N`` of a head read as zero and a head's tiles never touch its neighbour's. Inputs: bfloat16 or float16, ``D`` of
64 or 128 (``DG ≥ 16``), no mask tensor, no window, no softcap: :func:`hf_distrattn.plan.sm90_refusal` decides
which calls it takes.
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .launch import cdiv

# Triton 3.6 names the TMA load ``async_copy_global_to_shared``; later versions ``async_load``
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
WG_M = gl.constexpr(64)  # query rows per consumer warpgroup: wgmma's M for four warps
LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _loader(descs, bufs, bars, coords, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, G: gl.constexpr):
    """The TMA partition: both query tiles (and ``Wt`` at ``G > 1``), then key/value tile ``i`` into buffer
    ``i mod STAGES`` once both consumers have released it."""
    u_desc, k_desc, v_desc, wt_desc = descs
    u_bufs, k_bufs, v_bufs, wt_buf, kt_buf = bufs
    q_ready, k_ready, k_empty, v_ready, v_empty, kt_ready, turn = bars
    b, h, hk, start_m, blk = coords
    WT_BYTES: gl.constexpr = wt_desc.block_type.nbytes if G > 1 else 0
    mbarrier.expect(q_ready, 2 * u_desc.block_type.nbytes + WT_BYTES)
    _tma_load(u_desc, [b, h, start_m, 0], q_ready, u_bufs.index(0))
    _tma_load(u_desc, [b, h, start_m + WG_M, 0], q_ready, u_bufs.index(1))
    if G > 1:
        _tma_load(wt_desc, [b, h, blk, 0, 0], q_ready, wt_buf)
    for i in range(n_tiles):
        s = i % STAGES
        phase = (i // STAGES) & 1
        row = i * BLOCK_N
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        _tma_load(k_desc, [b, hk, row, 0], k_ready.index(s), k_bufs.index(s))
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        _tma_load(v_desc, [b, hk, row, 0], v_ready.index(s), v_bufs.index(s))


@gluon.jit
def _keys(k_tile, wt_buf, kt_buf, kt_ready, i, WG: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
          DG: gl.constexpr, G: gl.constexpr):
    """The score GEMM's B operand for key tile ``i``: ``Kᵀ`` (``G = 1``), else ``K̃ᵀ = (K · Wtᵀ)ᵀ``, this
    warpgroup computing rows ``[WG·BLOCK_N/2, (WG+1)·BLOCK_N/2)`` of ``K̃`` into ``kt_buf`` and waiting for the
    other half (``kt_ready``: one arrival per warpgroup and tile)."""
    if G == 1:
        keys = k_tile.reshape([BLOCK_N, D]).permute((1, 0))
    else:
        keys = _fused_keys(k_tile, wt_buf, kt_buf, kt_ready, i, WG, BLOCK_N, D, DG)
    return keys


@gluon.jit
def _fused_keys(k_tile, wt_buf, kt_buf, kt_ready, i, WG: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                DG: gl.constexpr):
    HALF: gl.constexpr = BLOCK_N // 2
    f_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DG, 16])
    rows = k_tile.reshape([BLOCK_N, D]).slice(WG * HALF, HALF, dim=0)
    kt = warpgroup_mma(rows, wt_buf.reshape([DG, D]).permute((1, 0)), gl.zeros([HALF, DG], gl.float32, f_layout),
                       use_acc=False)
    buf = kt_buf.index(i % 2)
    buf.slice(WG * HALF, HALF, dim=0).store(kt.to(kt_buf.dtype))
    fence_async_shared()
    mbarrier.arrive(kt_ready.index(i % 2), count=1)
    mbarrier.wait(kt_ready.index(i % 2), (i // 2) & 1)
    return buf.permute((1, 0))


@gluon.jit
def _softmax(s, m_i, l_i, start_n, rows, n_q, n_k, qk_scale, masked, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
             dtype: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Online-softmax update of one tile's scores ``s``: ``(P, α, m', l')`` with ``P`` as the ``P·V`` GEMM's
    register operand and ``α = 2^(m − m')`` laid out as the accumulator's rows."""
    if masked:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + (n_k - n_q))
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    return p_op, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), m_new, l_new


@gluon.jit
def _consumer(descs, bufs, bars, coords, n_tiles, n_q, n_k, qk_scale, out_ptr, lse_ptr, so_b, so_h, so_m, sl_b,
              sl_h, WG: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
              DG: gl.constexpr, STAGES: gl.constexpr, G: gl.constexpr):
    """One warpgroup's 64 query rows: the FlashAttention loop over the key tiles in FlashAttention-3's order
    (per tile ``j``, the score GEMM of ``j`` and ``P·V`` of ``j − 1`` issued together, in turns with the other
    warpgroup, then the softmax of ``j`` while ``P·V`` runs); then ``out`` and ``lse``."""
    u_bufs, k_bufs, v_bufs, wt_buf, kt_buf = bufs
    q_ready, k_ready, k_empty, v_ready, v_empty, kt_ready, turn = bars
    b, h, hk, start_m, blk = coords
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    dtype: gl.constexpr = v_bufs.dtype
    row0 = start_m + WG * WG_M
    rows = row0 + gl.arange(0, WG_M, layout=gl.SliceLayout(1, s_layout))
    first_masked = n_k - BLOCK_N + 1  # a tile starting here or later has keys past n_k
    if CAUSAL:
        first_masked = gl.minimum(first_masked, row0 + (n_k - n_q) - BLOCK_N + 2)
    m_i = gl.full([WG_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([WG_M, D], gl.float32, o_layout)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_ready, 0)
    u = u_bufs.index(WG).reshape([WG_M, DG])
    if n_tiles > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(u, _keys(k_bufs.index(0), wt_buf, kt_buf, kt_ready, 0, WG, BLOCK_N, D, DG, G), s_zero,
                          use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, rows, n_q, n_k, qk_scale, 0 >= first_masked, CAUSAL,
                                      BLOCK_N, dtype, s_layout, o_layout)
        for j in range(1, n_tiles):
            i = j - 1
            sj = j % STAGES
            si = i % STAGES
            mbarrier.wait(k_ready.index(sj), (j // STAGES) & 1)
            keys = _keys(k_bufs.index(sj), wt_buf, kt_buf, kt_ready, j, WG, BLOCK_N, D, DG, G)
            mbarrier.wait(turn.index(WG), (i + 1 - WG) & 1)  # warpgroup 0 goes first
            s = warpgroup_mma(u, keys, s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(si), (i // STAGES) & 1)
            acc = warpgroup_mma(p, v_bufs.index(si).reshape([BLOCK_N, D]), acc * alpha[:, None], is_async=True)
            mbarrier.arrive(turn.index(1 - WG), count=1)
            s = warpgroup_mma_wait(1, deps=(s,))
            mbarrier.arrive(k_empty.index(sj), count=1)
            start_n = j * BLOCK_N
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start_n, rows, n_q, n_k, qk_scale,
                                          start_n >= first_masked, CAUSAL, BLOCK_N, dtype, s_layout, o_layout)
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
            mbarrier.arrive(v_empty.index(si), count=1)
        last = n_tiles - 1
        sl = last % STAGES
        mbarrier.wait(v_ready.index(sl), (last // STAGES) & 1)
        acc = warpgroup_mma(p, v_bufs.index(sl).reshape([BLOCK_N, D]), acc * alpha[:, None], is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(sl), count=1)
    seen = l_i > 0.0
    lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) / LOG2E, float("-inf"))
    inv = gl.convert_layout(gl.where(seen, 1.0 / gl.where(seen, l_i, 1.0), 0.0), gl.SliceLayout(1, o_layout))
    out = acc * inv[:, None]
    o_rows = row0 + gl.arange(0, WG_M, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    b64 = b.to(gl.int64)  # offsets past 2³¹ elements
    h64 = h.to(gl.int64)
    o_ptrs = out_ptr + b64 * so_b + h64 * so_h + o_rows.to(gl.int64)[:, None] * so_m + o_cols[None, :]
    gl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_rows[:, None] < n_q)
    gl.store(lse_ptr + b64 * sl_b + h64 * sl_h + rows, lse, mask=rows < n_q)


@gluon.jit
def _distr_fwd_sm90(u_desc, k_desc, v_desc, wt_desc, out_ptr, lse_ptr, qk_scale, n_q, n_k, heads, kv_group,
                    first_block, n_blocks, so_b, so_h, so_m, sl_b, sl_h, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                    D: gl.constexpr, DG: gl.constexpr, STAGES: gl.constexpr, G: gl.constexpr):
    """One program per (batch·head, block of 128 queries), causal blocks longest first: shared memory, barriers,
    then the three partitions."""
    pid = gl.program_id(0)
    bh = pid // n_blocks
    m_blk = pid % n_blocks
    if CAUSAL:
        m_blk = n_blocks - 1 - m_blk  # the longest rows first
    m_blk += first_block
    b = bh // heads
    h = bh % heads
    hk = h // kv_group
    start_m = m_blk * (2 * WG_M)
    hi = n_k
    if CAUSAL:
        hi = gl.minimum(n_k, gl.maximum(start_m + 2 * WG_M + (n_k - n_q), 0))
    n_tiles = (hi + BLOCK_N - 1) // BLOCK_N
    u_bufs = gl.allocate_shared_memory(u_desc.dtype, [2] + u_desc.block_type.shape, u_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    wt_buf = gl.allocate_shared_memory(wt_desc.dtype, wt_desc.block_type.shape, wt_desc.layout)
    kt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DG], u_desc.dtype)
    kt_buf = gl.allocate_shared_memory(u_desc.dtype, [2, BLOCK_N, DG], kt_layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_ready = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    kt_ready = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(kt_ready.index(i), count=2)
        mbarrier.init(turn.index(i), count=1)
    descs = (u_desc, k_desc, v_desc, wt_desc)
    bufs = (u_bufs, k_bufs, v_bufs, wt_buf, kt_buf)
    bars = (q_ready, k_ready, k_empty, v_ready, v_empty, kt_ready, turn)
    coords = (b, h, hk, start_m, m_blk)  # m_blk: the grouping block of Wt
    gl.warp_specialize([
        (_consumer, (descs, bufs, bars, coords, n_tiles, n_q, n_k, qk_scale, out_ptr, lse_ptr, so_b, so_h, so_m,
                     sl_b, sl_h, 0, CAUSAL, BLOCK_N, D, DG, STAGES, G)),
        (_consumer, (descs, bufs, bars, coords, n_tiles, n_q, n_k, qk_scale, out_ptr, lse_ptr, so_b, so_h, so_m,
                     sl_b, sl_h, 1, CAUSAL, BLOCK_N, D, DG, STAGES, G)),
        (_loader, (descs, bufs, bars, coords, n_tiles, BLOCK_N, STAGES, G)),
    ], [4, 1], [240, 24])


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    gdtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdtype))


def attention(u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wt: torch.Tensor | None, out: torch.Tensor,
              lse: torch.Tensor, *, causal: bool, scale: float, group_size: int, first_block: int = 0,
              count: int | None = None, block_n: int = 128, stages: int = 2) -> None:
    """Writes ``out`` ``(B, H, Nq, D)`` (any strides, unit last) and ``lse`` ``(B, H, Nq)`` (float32, natural log)
    for query blocks ``first_block … first_block + count − 1`` (blocks of 128; all by default). ``u``
    ``(B, H, ≥ Nq, DG)``: the queries at ``G = 1``, the grouping's ``U`` otherwise, with ``wt``
    ``(B, H, n_blocks, DG, D)`` per block of 128 queries; ``k``, ``v`` ``(B, Hkv, Nk, D)``."""
    batch, heads, n_q = out.shape[:3]
    h_kv, n_k, d = k.shape[1], k.shape[2], k.shape[3]
    dg = u.shape[-1]
    count = cdiv(n_q, 128) - first_block if count is None else count
    wt_desc = _desc(wt, [1, 1, 1, dg, d]) if wt is not None else _desc(v, [1, 1, 16, 16])
    _distr_fwd_sm90[(batch * heads * count,)](
        _desc(u, [1, 1, 64, dg]), _desc(k, [1, 1, block_n, d]), _desc(v, [1, 1, block_n, d]), wt_desc, out, lse,
        scale * math.log2(math.e), n_q, n_k, heads, heads // h_kv, first_block, count, out.stride(0), out.stride(1),
        out.stride(2), lse.stride(0), lse.stride(1), CAUSAL=causal, BLOCK_N=block_n, D=d, DG=dg, STAGES=stages,
        G=group_size, num_warps=4, maxnreg=168)
