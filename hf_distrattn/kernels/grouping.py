r"""Fused pre-pass in Triton: :func:`hf_distrattn.grouping.group_blocks` for one block of queries per program.

For a block ``X`` (``BLOCK_M × D``, rows past ``n`` read as zero) and its *source* ``X_s`` (the block itself, or
with ``CAUSAL`` the previous block, zeros for block 0), loaded once each:

1. codes: ``bits = (X_sᵀ R > 0)`` with ``R`` the seeded ``(BLOCK_M, num_hashes)`` projections,
   ``code_c = Σ_i bits_ci 2^i``; ``perm`` = columns sorted by ``code · D + c`` (one ``tl.sort``);
2. bucket order on the tensor cores, through the one-hot ``P[c, k] = [perm_k = c]``: the Gram matrix
   ``(X_s P)ᵀ (X_s P)``, whose ``G × G`` diagonal blocks are the groups' ``C_g``;
3. factors: ``"rank1"``: ``v_g`` = top eigenvector of ``C_g`` by 8 trace-normalised squarings (``C^256 · 1``),
   sign so that ``Σ v ≥ 0``; ``"sample"``: fuse weights 1;
4. the fuse matrix ``Wt = F Pᵀ`` ``(DG_PAD, D)`` (``F`` holds group ``j``'s weights on its bucket positions), so
   ``Wt[j, perm[jG+i]] = v_g[i]`` and the attention kernel fuses a key tile with one GEMM, ``K'ᵀ = Wt · Kᵀ``;
   and ``U = X Wtᵀ`` (``"rank1"``: ``u_g = X_g v_g``; ``"sample"``: the group's first column instead).
   Rows of ``Wt`` and columns of ``U`` past ``DG`` are zero.

16-bit inputs use the tensor cores throughout: products with a one-hot are exact, the others are exact in the
float32 accumulator, and ``R`` is passed as three 16-bit parts whose sum is its float32 value, so the projections
carry float32 accuracy; ``v`` is rounded to the input dtype once, in ``Wt``, and ``U`` uses that same ``Wt``.
float32 inputs use IEEE float32 products (``R`` in one part).

With ``PROJECT`` the launch writes the projection ``X̃ = (X Wtᵀ) Wt`` of its own block in place of ``U`` (the
training path's ``Q̃``; its backward applies the same map to ``dQ̃`` with :func:`project_block`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..grouping import lsh_projections
from .launch import cached

BLOCK_SIZES = (16, 32, 64, 128)


def takes(x: torch.Tensor, config: DistrConfig) -> bool:
    """Whether :func:`group_queries` takes ``x`` with these settings: LSH grouping, a power-of-two head dim, a
    block size in :data:`BLOCK_SIZES`, at most 16 hash bits."""
    d = x.shape[-1]
    return (config.grouping == "lsh" and not d & (d - 1) and config.block_size in BLOCK_SIZES
            and config.num_hashes <= 16)


@triton.jit
def _load_rows(base, first, n, stride_m, BLOCK_M: tl.constexpr, D: tl.constexpr):
    rows = first + tl.arange(0, BLOCK_M)
    inside = (rows[:, None] >= 0) & (rows[:, None] < n)
    return tl.load(base + rows[:, None] * stride_m + tl.arange(0, D)[None, :], mask=inside, other=0.0)


@triton.jit
def project_block(x, wt, pid_m, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """``(X Wtᵀ) Wt`` of a block in float32, ``X Wtᵀ`` rounded to ``x``'s dtype as ``U`` is; ``CAUSAL``: block 0
    as it is."""
    u = tl.dot(x, tl.trans(wt), input_precision=PRECISION).to(x.dtype)
    y = tl.dot(u, wt, input_precision=PRECISION)
    if CAUSAL:
        y = tl.where(pid_m == 0, x.to(tl.float32), y)
    return y


@cached
@triton.jit
def _group_block(Q, R, U, Wt, n, heads, sq_b, sq_h, sq_m, su_b, su_h, su_m, sw_b, sw_h, sw_blk, sw_j,
                 CAUSAL: tl.constexpr, RANK1: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                 G: tl.constexpr, DG: tl.constexpr, DG_PAD: tl.constexpr, NH: tl.constexpr,
                 R_PARTS: tl.constexpr, PRECISION: tl.constexpr, PROJECT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_base = Q + b * sq_b + h * sq_h
    offs_d = tl.arange(0, D)
    x = _load_rows(q_base, pid_m * BLOCK_M, n, sq_m, BLOCK_M, D)
    xs = x
    if CAUSAL:
        xs = _load_rows(q_base, (pid_m - 1) * BLOCK_M, n, sq_m, BLOCK_M, D)
    r_offs = tl.arange(0, BLOCK_M)[:, None] * NH + tl.arange(0, NH)[None, :]
    xs_t = tl.trans(xs)
    proj = tl.dot(xs_t, tl.load(R + r_offs), input_precision=PRECISION)  # (D, NH)
    for part in tl.static_range(1, R_PARTS):
        proj = tl.dot(xs_t, tl.load(R + part * BLOCK_M * NH + r_offs), proj, input_precision=PRECISION)
    weights = (1 << tl.arange(0, NH)).to(tl.int32)
    code = tl.sum(tl.where(proj > 0, weights[None, :], 0), axis=1)
    perm = tl.sort(code * D + offs_d) % D  # (D,) columns in bucket order
    one_hot = (offs_d[:, None] == perm[None, :]).to(x.dtype)  # (D, D): column c to position k
    if RANK1:
        member = tl.arange(0, G)
        xs_p = tl.dot(xs, one_hot, input_precision=PRECISION).to(x.dtype)  # bucket order (exact: x's own values)
        full = tl.reshape(tl.dot(tl.trans(xs_p), xs_p, input_precision=PRECISION), (DG, G, DG, G))
        same = tl.arange(0, DG)[:, None, None, None] == tl.arange(0, DG)[None, None, :, None]
        gram = tl.sum(tl.where(same, full, 0.0), axis=2)  # (DG, G, G): the groups' C_g
        power = gram
        for _ in tl.static_range(8):
            power = tl.sum(power[:, :, :, None] * power[:, None, :, :], axis=2)
            trace = tl.sum(tl.sum(tl.where(member[:, None] == member[None, :], power, 0.0), axis=2), axis=1)
            power = power / tl.where(trace > 0, trace, 1.0)[:, None, None]
        v = tl.sum(power, axis=2)  # (DG, G) = C^256 · 1
        v = tl.where(tl.sum(v * v, axis=1)[:, None] > 0, v, 1.0)  # a zero block: v = 1/√G
        v = v / tl.sqrt(tl.sum(v * v, axis=1))[:, None]
        fuse = tl.reshape(tl.where(tl.sum(v, axis=1)[:, None] < 0, -v, v), (D,))  # weight of bucket position k
    else:
        fuse = tl.full([D], 1.0, tl.float32)
    # Wt = F · Pᵀ with F[j, k] = fuse_k on group j's positions k: one product per output element, exact
    offs_j = tl.arange(0, DG_PAD)
    in_group = offs_d[None, :] // G == offs_j[:, None]
    wt = tl.dot(tl.where(in_group, fuse[None, :], 0.0).to(x.dtype), tl.trans(one_hot), input_precision=PRECISION)
    wt = wt.to(x.dtype)  # (DG_PAD, D), zero rows past DG
    w_base = Wt + b * sw_b + h * sw_h + pid_m * sw_blk
    tl.store(w_base + offs_j[:, None] * sw_j + offs_d[None, :], wt)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PROJECT:  # U is (n, D): the projection X̃ = (X Wtᵀ) Wt
        tl.store(U + b * su_b + h * su_h + rows[:, None] * su_m + offs_d[None, :],
                 project_block(x, wt, pid_m, CAUSAL, PRECISION).to(U.dtype.element_ty), mask=rows[:, None] < n)
    else:
        wu = wt  # U = X · Wuᵀ: the rank-1 weights, or "sample"'s first column of each group
        if not RANK1:
            first = in_group & (offs_d[None, :] % G == 0)
            wu = tl.dot(tl.where(first, 1.0, 0.0).to(x.dtype), tl.trans(one_hot),
                        input_precision=PRECISION).to(x.dtype)
        u = tl.dot(x, tl.trans(wu), input_precision=PRECISION)  # (BLOCK_M, DG_PAD)
        tl.store(U + b * su_b + h * su_h + rows[:, None] * su_m + offs_j[None, :], u.to(U.dtype.element_ty))


@functools.lru_cache(maxsize=64)
def _projection_parts(block: int, num_hashes: int, seed: int, nh: int, device: torch.device, dtype: torch.dtype):
    """The hash's projections zero-padded to ``nh`` columns, as ``(parts, block, nh)`` in ``dtype`` summing to the
    float32 values (three parts for 16-bit dtypes, one for float32)."""
    r = torch.zeros(block, nh, dtype=torch.float32)
    r[:, :num_hashes] = lsh_projections(block, num_hashes, seed, "cpu", torch.float32)
    parts = []
    for _ in range(1 if dtype == torch.float32 else 3):
        parts.append(r.to(dtype))
        r = r - parts[-1].float()
    return torch.stack(parts).to(device)


def group_queries(q: torch.Tensor, config: DistrConfig, dg_pad: int, causal: bool = False,
                  project: bool = False):
    """``U`` ``(B, H, n_blocks·BLOCK_M, dg_pad)`` (zero padding columns) and ``Wt`` ``(B, H, n_blocks, dg_pad, d)``.

    ``Wt`` is float32 for float32 ``q``, else ``q``'s dtype. Needs a power-of-two head dim ``d``. ``causal``: each
    block grouped by the previous block's rows (block 0 by zeros; the callers compute it exactly).
    ``project=True``: the projection ``Q̃ = (Q Wtᵀ) Wt`` ``(B, H, n, d)`` (block 0 as it is when ``causal``;
    ``X Wtᵀ`` rounded to ``q``'s dtype as ``U`` is) in place of ``U``, from the same launch (the training path's
    forward). ``M = Wtᵀ Wt`` is symmetric, so ``∂L/∂Q = (∂L/∂Q̃) M`` with the grouping held constant.
    """
    batch, heads, n, d = q.shape
    block, group = config.block_size, config.group_size
    n_blocks = triton.cdiv(n, block)
    nh = max(16, triton.next_power_of_2(config.num_hashes))
    r = _projection_parts(block, config.num_hashes, config.seed, nh, q.device, q.dtype)
    u = torch.empty_like(q) if project else torch.empty(batch, heads, n_blocks * block, dg_pad, device=q.device,
                                                            dtype=q.dtype)
    wt = torch.empty(batch, heads, n_blocks, dg_pad, d, device=q.device, dtype=q.dtype)
    _group_block[(n_blocks, batch * heads)](
        q, r, u, wt, n, heads, q.stride(0), q.stride(1), q.stride(2), u.stride(0), u.stride(1), u.stride(2),
        wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(3),
        CAUSAL=int(causal), RANK1=config.reduce == "rank1", BLOCK_M=block, D=d, G=group, DG=d // group,
        DG_PAD=dg_pad, NH=nh, R_PARTS=r.shape[0], PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PROJECT=project, num_warps=4,
    )
    return u, wt
