r"""Fused pre-pass in Triton: :func:`hf_distrattn.grouping.group_blocks` for one block of queries per program.

For a block ``X`` (``BLOCK_M × D``, rows past ``n`` read as zero) and its *source* ``X_s`` (the block itself, or
with ``CAUSAL`` the previous block, zeros for block 0):

1. codes: ``bits = (X_sᵀ R > 0)`` with ``R`` the seeded ``(BLOCK_M, num_hashes)`` projections (float32 GEMM),
   ``code_c = Σ_i bits_ci 2^i``; ``perm`` = columns sorted by ``code · D + c`` (one ``tl.sort``);
2. factors: with ``X_g`` the group-``g`` columns, ``C_g = X_{s,g}ᵀ X_{s,g}`` accumulated over row chunks;
   ``"rank1"``: ``v_g`` = top eigenvector of ``C_g`` by 8 trace-normalised squarings (``C^256 · 1``), sign so
   that ``Σ v ≥ 0``, and ``u_g = X_g v_g``; ``"sample"``: ``u_g`` = first column, fuse weights 1;
3. outputs ``U`` ``(BLOCK_M, DG)`` and the fuse matrix ``Wt`` ``(DG, D)``, ``Wt[j, perm[jG+i]] = v_g[i]``,
   so that the attention kernel fuses a key tile with one GEMM, ``K'ᵀ = Wt · Kᵀ``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..grouping import lsh_projections

ROW_CHUNK = 16
BLOCK_SIZES = (16, 32, 64, 128)


def takes(x: torch.Tensor, config: DistrConfig) -> bool:
    """Whether :func:`group_queries` takes ``x`` with these settings: LSH grouping, a power-of-two head dim, a
    block size in :data:`BLOCK_SIZES`, at most 16 hash bits."""
    d = x.shape[-1]
    return (config.grouping == "lsh" and not d & (d - 1) and config.block_size in BLOCK_SIZES
            and config.num_hashes <= 16)


@triton.jit
def _group_block(Q, R, U, Wt, n, heads, sq_b, sq_h, sq_m, su_b, su_h, su_m, sw_b, sw_h, sw_blk, sw_j,
                 CAUSAL: tl.constexpr, RANK1: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                 G: tl.constexpr, DG: tl.constexpr, DG_PAD: tl.constexpr, NH: tl.constexpr, CHUNK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    source = (pid_m - CAUSAL) * BLOCK_M  # first row of the block the grouping is read from
    offs_s = source + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_base = Q + b * sq_b + h * sq_h
    x = tl.load(q_base + offs_s[:, None] * sq_m + offs_d[None, :], mask=(offs_s[:, None] >= 0) & (offs_s[:, None] < n),
                other=0.0)
    r = tl.load(R + tl.arange(0, BLOCK_M)[:, None] * NH + tl.arange(0, NH)[None, :])
    proj = tl.dot(tl.trans(x.to(tl.float32)), r, input_precision="ieee")  # (D, NH)
    weights = (1 << tl.arange(0, NH)).to(tl.int32)
    code = tl.sum(tl.where(proj > 0, weights[None, :], 0), axis=1)
    perm = tl.sort(code * D + offs_d) % D  # (D,) columns in bucket order
    # Gram matrices of the groups, over row chunks of the permuted block
    gram = tl.zeros([DG, G, G], tl.float32)
    for start in range(0, BLOCK_M, CHUNK):
        rows = source + start + tl.arange(0, CHUNK)
        xc = tl.load(q_base + rows[:, None] * sq_m + perm[None, :], mask=(rows[:, None] >= 0) & (rows[:, None] < n),
                     other=0.0)
        xc = tl.reshape(xc.to(tl.float32), (CHUNK, DG, G))
        gram += tl.sum(xc[:, :, :, None] * xc[:, :, None, :], axis=0)
    member = tl.arange(0, G)
    if RANK1:
        power = gram
        for _ in tl.static_range(8):
            power = tl.sum(power[:, :, :, None] * power[:, None, :, :], axis=2)
            trace = tl.sum(tl.sum(tl.where(member[:, None] == member[None, :], power, 0.0), axis=2), axis=1)
            power = power / tl.where(trace > 0, trace, 1.0)[:, None, None]
        v = tl.sum(power, axis=2)  # (DG, G) = C^256 · 1
        v = tl.where(tl.sum(v * v, axis=1)[:, None] > 0, v, 1.0)  # a zero block: v = 1/√G
        v = v / tl.sqrt(tl.sum(v * v, axis=1))[:, None]
        v = tl.where(tl.sum(v, axis=1)[:, None] < 0, -v, v)
        u_weights = v
        fuse = v
    else:
        u_weights = tl.where(member[None, :] == 0, 1.0, 0.0) + tl.zeros([DG, G], tl.float32)
        fuse = tl.full([DG, G], 1.0, tl.float32)
    for start in range(0, BLOCK_M, CHUNK):
        rows = pid_m * BLOCK_M + start + tl.arange(0, CHUNK)
        xc = tl.load(q_base + rows[:, None] * sq_m + perm[None, :], mask=rows[:, None] < n, other=0.0)
        u = tl.sum(tl.reshape(xc.to(tl.float32), (CHUNK, DG, G)) * u_weights[None, :, :], axis=2)  # (CHUNK, DG)
        u_ptrs = U + b * su_b + h * su_h + rows[:, None] * su_m + tl.arange(0, DG)[None, :]
        tl.store(u_ptrs, u.to(U.dtype.element_ty))
    # Wt[j, c] = fuse[j, i] where c = perm[j*G + i]
    hit = tl.reshape(perm, (DG, G))[:, :, None] == offs_d[None, None, :]
    wt = tl.sum(tl.where(hit, fuse[:, :, None], 0.0), axis=1)  # (DG, D)
    w_base = Wt + b * sw_b + h * sw_h + pid_m * sw_blk
    tl.store(w_base + tl.arange(0, DG)[:, None] * sw_j + offs_d[None, :], wt.to(Wt.dtype.element_ty))
    if DG_PAD > DG:
        pad_rows = tl.arange(0, DG_PAD)
        tl.store(w_base + pad_rows[:, None] * sw_j + offs_d[None, :], tl.zeros([DG_PAD, D], tl.float32),
                 mask=pad_rows[:, None] >= DG)


def group_queries(q: torch.Tensor, config: DistrConfig, dg_pad: int, causal: bool = False):
    """``U`` ``(B, H, n_blocks·BLOCK_M, dg_pad)`` (zero padding columns) and ``Wt`` ``(B, H, n_blocks, dg_pad, d)``.

    ``Wt`` is float32 for float32 ``q``, else ``q``'s dtype. Needs a power-of-two head dim ``d``. ``causal``: each
    block grouped by the previous block's rows (block 0 by zeros; the callers compute it exactly).
    """
    batch, heads, n, d = q.shape
    block, group = config.block_size, config.group_size
    n_blocks = triton.cdiv(n, block)
    nh = max(16, triton.next_power_of_2(config.num_hashes))
    r = torch.zeros(block, nh, device=q.device, dtype=torch.float32)
    r[:, : config.num_hashes] = lsh_projections(block, config.num_hashes, config.seed, q.device, torch.float32)
    u = torch.zeros(batch, heads, n_blocks * block, dg_pad, device=q.device, dtype=q.dtype)
    wt = torch.empty(batch, heads, n_blocks, dg_pad, d, device=q.device, dtype=q.dtype)
    _group_block[(n_blocks, batch * heads)](
        q, r, u, wt, n, heads, q.stride(0), q.stride(1), q.stride(2), u.stride(0), u.stride(1), u.stride(2),
        wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(3),
        CAUSAL=int(causal), RANK1=config.reduce == "rank1", BLOCK_M=block, D=d, G=group, DG=d // group,
        DG_PAD=dg_pad, NH=nh, CHUNK=min(ROW_CHUNK, block), num_warps=4,
    )
    return u, wt
