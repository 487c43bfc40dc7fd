r"""The grouping in Triton: :func:`hf_distrattn.grouping.group_blocks` with one block per program.

For a source block ``X_s`` (``BLOCK_M × D``: the block itself, or with ``CAUSAL`` the previous block, zeros for
block 0), loaded once, :func:`_fuse_matrix` computes

1. codes: ``bits = (X_sᵀ R > 0)`` with ``R`` the ``±1`` hash directions
   (:func:`hf_distrattn.grouping.hash_directions`, exact in 16 bits), ``code_c = Σ_i bits_ci 2^i``;
   ``perm`` = columns sorted by ``code · D + c`` (one ``tl.sort``);
2. bucket order on the tensor cores, through the one-hot ``P[c, k] = [perm_k = c]``: the Gram matrix
   ``(X_s P)ᵀ (X_s P)``, whose ``G × G`` diagonal blocks are the groups' ``C_g``;
3. factors: ``"rank1"``: ``v_g`` = top eigenvector of ``C_g`` by 8 trace-normalised squarings (``C^256 · 1``),
   sign so that ``Σ v ≥ 0``; ``"sample"``: fuse weights 1;
4. the fuse matrix ``Wt = F Pᵀ`` ``(DG_PAD, D)`` (``F`` holds group ``j``'s weights on its bucket positions), so
   ``Wt[j, perm[jG+i]] = v_g[i]`` and a kernel fuses a tile with one GEMM, ``Y'ᵀ = Wt · Yᵀ``; and ``Wu``, the
   weights that make ``U = X Wuᵀ`` (``Wt`` itself for ``"rank1"``; the group's first column for ``"sample"``).
   Rows past ``DG`` are zero.

16-bit inputs use the tensor cores throughout (products with a one-hot or with ``±1`` are exact, the others
exact in the float32 accumulator); ``v`` is rounded to the input dtype once, in ``Wt``. float32 inputs use IEEE
float32 products.

Two kernels use it. :func:`reduce_operand` (a program per block): ``U`` and ``Wt``, or with ``PROJECT`` the
projection ``X̃ = (X Wtᵀ) Wt`` of the block (the training path's ``Q̃``; its backward applies the same map to
``dQ̃`` with :func:`project_block`). :func:`reduce_keys` (a program per block that new keys fall in, the first
block read from a tensor so that a CUDA graph can replay it): the compact ``Wt`` of each block and ``U`` of the
new rows only, for the reduced-key cache, and for a static cache the new keys and values written into it in the
same launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from ..config import DistrConfig
from .launch import cached, cdiv, pdl


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


@triton.jit
def _fuse_matrix(xs, R, RANK1: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                 DG: tl.constexpr, DG_PAD: tl.constexpr, NH: tl.constexpr, PRECISION: tl.constexpr):
    """``(Wt, Wu, one_hot, fuse)`` of the source block ``xs`` (module notes): ``one_hot[c, k] = [perm_k = c]`` and
    ``fuse[k]`` the weight of bucket position ``k``."""
    offs_d = tl.arange(0, D)
    r = tl.load(R + tl.arange(0, BLOCK_M)[:, None] * NH + tl.arange(0, NH)[None, :]).to(xs.dtype)
    proj = tl.dot(tl.trans(xs), r, input_precision=PRECISION)  # (D, NH)
    weights = (1 << tl.arange(0, NH)).to(tl.int32)
    code = tl.sum(tl.where(proj > 0, weights[None, :], 0), axis=1)
    perm = tl.sort(code * D + offs_d) % D  # (D,) columns in bucket order
    one_hot = (offs_d[:, None] == perm[None, :]).to(xs.dtype)  # (D, D): column c to position k
    if RANK1:
        member = tl.arange(0, G)
        xs_p = tl.dot(xs, one_hot, input_precision=PRECISION).to(xs.dtype)  # bucket order (exact: xs's own values)
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
    wt = tl.dot(tl.where(in_group, fuse[None, :], 0.0).to(xs.dtype), tl.trans(one_hot),
                input_precision=PRECISION).to(xs.dtype)  # (DG_PAD, D), zero rows past DG
    wu = wt
    if not RANK1:  # "sample": u is the group's first column
        first = in_group & (offs_d[None, :] % G == 0)
        wu = tl.dot(tl.where(first, 1.0, 0.0).to(xs.dtype), tl.trans(one_hot), input_precision=PRECISION).to(xs.dtype)
    return wt, wu, one_hot, fuse


@cached
@triton.jit
def _group_block(Q, R, U, Wt, n, heads, sq_b, sq_h, sq_m, su_b, su_h, su_m, sw_b, sw_h, sw_blk, sw_j,
                 CAUSAL: tl.constexpr, RANK1: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
                 G: tl.constexpr, DG: tl.constexpr, DG_PAD: tl.constexpr, NH: tl.constexpr,
                 PRECISION: tl.constexpr, PROJECT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch and head offsets in 64 bits (prefill's notes)
    b = bh // heads
    h = bh % heads
    q_base = Q + b * sq_b + h * sq_h
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, DG_PAD)
    x = _load_rows(q_base, pid_m * BLOCK_M, n, sq_m, BLOCK_M, D)
    xs = x
    if CAUSAL:
        xs = _load_rows(q_base, (pid_m - 1) * BLOCK_M, n, sq_m, BLOCK_M, D)
    wt, wu, _, _ = _fuse_matrix(xs, R, RANK1, BLOCK_M, D, G, DG, DG_PAD, NH, PRECISION)
    tl.store(Wt + b * sw_b + h * sw_h + pid_m * sw_blk + offs_j[:, None] * sw_j + offs_d[None, :], wt)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PROJECT:  # U is (n, D): the projection X̃ = (X Wtᵀ) Wt
        tl.store(U + b * su_b + h * su_h + rows[:, None] * su_m + offs_d[None, :],
                 project_block(x, wt, pid_m, CAUSAL, PRECISION).to(U.dtype.element_ty), mask=rows[:, None] < n)
    else:
        u = tl.dot(x, tl.trans(wu), input_precision=PRECISION)  # (BLOCK_M, DG_PAD)
        tl.store(U + b * su_b + h * su_h + rows[:, None] * su_m + offs_j[None, :], u.to(U.dtype.element_ty))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def reduce_operand(x: torch.Tensor, hashes: torch.Tensor, config: DistrConfig, dg_pad: int, causal: bool = False,
                  project: bool = False):
    """``U`` ``(B, H, n_blocks·BLOCK_M, dg_pad)`` (zero padding columns) and ``Wt`` ``(B, H, n_blocks, dg_pad, d)``
    of every block of ``x`` ``(B, H, n, d)`` (queries or keys; ``d`` a power of two; unit-stride head dim).

    ``Wt`` is in ``x``'s dtype. ``hashes``: :func:`hf_distrattn.grouping.hash_directions` for the block size.
    ``causal``: each block grouped by the previous block's rows (block 0 by zeros; the callers compute it
    exactly). ``project=True``: the projection ``X̃ = (X Wtᵀ) Wt`` ``(B, H, n, d)`` (block 0 as it is when
    ``causal``; ``X Wtᵀ`` rounded to ``x``'s dtype as ``U`` is) in place of ``U``, from the same launch (the
    training path's forward). ``M = Wtᵀ Wt`` is symmetric, so ``∂L/∂X = (∂L/∂X̃) M`` with the grouping constant.
    """
    batch, heads, n, d = x.shape
    block, group = config.block_size, config.group_size
    n_blocks = cdiv(n, block)
    u = torch.empty_like(x) if project else torch.empty(batch, heads, n_blocks * block, dg_pad, device=x.device,
                                                            dtype=x.dtype)
    wt = torch.empty(batch, heads, n_blocks, dg_pad, d, device=x.device, dtype=x.dtype)
    _group_block[(n_blocks, batch * heads)](
        x, hashes, u, wt, n, heads, x.stride(0), x.stride(1), x.stride(2), u.stride(0), u.stride(1), u.stride(2),
        wt.stride(0), wt.stride(1), wt.stride(2), wt.stride(3),
        CAUSAL=int(causal), RANK1=config.reduce == "rank1", BLOCK_M=block, D=d, G=group, DG=d // group,
        DG_PAD=dg_pad, NH=hashes.shape[-1], PRECISION=_precision(x.dtype), PROJECT=project, num_warps=4,
    )
    return u, wt


@triton.jit
def _store_reduced(x, wu, group, weight, U, Grp, W, rows, new, g_base, su_m, DG_PAD: tl.constexpr,
                   D: tl.constexpr, PRECISION: tl.constexpr):
    """Store a block's compact fuse matrix and the reduced form ``x Wuᵀ`` of its new rows."""
    offs_d = tl.arange(0, D)
    tl.store(Grp + g_base + offs_d, group)
    tl.store(W + g_base + offs_d, weight)
    u = tl.dot(x, tl.trans(wu), input_precision=PRECISION)  # (BLOCK_M, DG_PAD)
    tl.store(U + rows[:, None] * su_m + tl.arange(0, DG_PAD)[None, :], u.to(U.dtype.element_ty), mask=new[:, None])


@triton.jit
def _key_rows(k_base, ks_base, first, start, n_end, sk_m, sks_m, WRITE: tl.constexpr, BLOCK_M: tl.constexpr,
              D: tl.constexpr):
    """Rows ``first ..`` (``BLOCK_M``) of the keys as this update leaves them, zeros outside ``0 .. n_end − 1``: those
    before ``start`` from the cache, the new ones from the update's keys when it writes them (``WRITE``; then no
    program reads a cache row that another writes), else from the cache."""
    x = _load_rows(k_base, first, start if WRITE else n_end, sk_m, BLOCK_M, D)
    if WRITE:  # the update's row r is the cache's row start + r
        x += _load_rows(ks_base, first - start, n_end - start, sks_m, BLOCK_M, D)
    return x


@cached
@triton.jit
def _reduce_keys(K, V, KS, VS, R, Start, U, Grp, W, n_new, heads, capacity, sk_b, sk_h, sk_m, sv_b, sv_h,
                 sv_m, sks_b, sks_h, sks_m, svs_b, svs_h, svs_m, su_b, su_h, su_m, sg_b, sg_h, sg_blk,
                 WRITE: tl.constexpr, RANK1: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                 DG: tl.constexpr, DG_PAD: tl.constexpr, NH: tl.constexpr, PRECISION: tl.constexpr,
                 PDL: tl.constexpr):
    """One program per (block spanned by the new keys, batch·head): with ``WRITE`` copies its new rows of ``KS``/``VS``
    into the cache ``K``/``V``; writes the block's compact fuse matrix into ``Grp``/``W`` and its new rows' reduced
    form into ``U`` (the cache's tensors, in place). Rows from ``capacity`` on (the cache's) are neither written nor
    reduced. Programs past the last block redo it and write the same values. ``PDL``: the decode kernel after it
    may launch now (:func:`~.launch.pdl`; it waits for this grid before reading the cache)."""
    if PDL:
        gdc_launch_dependents()
    p = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # batch and head offsets in 64 bits (prefill's notes)
    b = bh // heads
    h = bh % heads
    start = tl.load(Start)
    n_end = tl.minimum(start + n_new, capacity)
    j = tl.minimum(start // BLOCK_M + p, (n_end - 1) // BLOCK_M)  # programs past the last block redo it
    k_base = K + b * sk_b + h * sk_h
    ks_base = KS + b * sks_b + h * sks_h
    offs_d = tl.arange(0, D)
    rows = j * BLOCK_M + tl.arange(0, BLOCK_M)
    new = (rows >= start) & (rows < n_end)
    x = _key_rows(k_base, ks_base, j * BLOCK_M, start, n_end, sk_m, sks_m, WRITE, BLOCK_M, D)
    if WRITE:
        tl.store(k_base + rows[:, None] * sk_m + offs_d[None, :], x, mask=new[:, None])
        values = _load_rows(VS + b * svs_b + h * svs_h, j * BLOCK_M - start, n_end - start, svs_m, BLOCK_M, D)
        tl.store(V + b * sv_b + h * sv_h + rows[:, None] * sv_m + offs_d[None, :], values, mask=new[:, None])
    u_base = U + b * su_b + h * su_h
    g_base = b * sg_b + h * sg_h + j * sg_blk
    fresh = j * BLOCK_M >= start  # the block starts among the new keys: group it (once per block)
    if not RANK1:
        fresh = j >= 0  # "sample" keeps no compact form of its first columns: always regroup
    if fresh:  # by block j - 1: complete, or zeros
        xs = _key_rows(k_base, ks_base, (j - 1) * BLOCK_M, start, n_end, sk_m, sks_m, WRITE, BLOCK_M, D)
        wt, wu, one_hot, fuse = _fuse_matrix(xs, R, RANK1, BLOCK_M, D, G, DG, DG_PAD, NH, PRECISION)
        # compact Wt: column c's group (its bucket position // G) and weight (the value Wt holds)
        group = tl.sum(one_hot.to(tl.float32) * (offs_d // G).to(tl.float32)[None, :], axis=1).to(tl.int32)
        weight = tl.sum(one_hot.to(tl.float32) * fuse[None, :], axis=1).to(xs.dtype).to(tl.float32)
        _store_reduced(x, wu, group, weight, u_base, Grp, W, rows, new, g_base, su_m, DG_PAD, D, PRECISION)
    else:  # grouped by an earlier update: its stored compact form (rank-1 groups: Wu = Wt)
        group = tl.load(Grp + g_base + offs_d)
        weight = tl.load(W + g_base + offs_d)
        wt = tl.where(group[None, :] == tl.arange(0, DG_PAD)[:, None], weight[None, :], 0.0).to(x.dtype)
        _store_reduced(x, wt, group, weight, u_base, Grp, W, rows, new, g_base, su_m, DG_PAD, D, PRECISION)


def reduce_keys(keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, hashes: torch.Tensor,
                key_states: torch.Tensor | None, value_states: torch.Tensor | None, n_new: int, config: DistrConfig,
                reduced_keys: torch.Tensor, fuse_group: torch.Tensor, fuse_weight: torch.Tensor) -> None:
    """Write the reduced form of keys ``start .. start + n_new − 1`` of the cache ``keys`` ``(B, H, N, d)``
    (``start`` a 0-d int64 tensor on the device) into the cache's tensors, in place, each block grouped by the one
    before it: rows ``start ..`` of ``reduced_keys`` ``(B, H, capacity, dg_pad)``, and for each block the new keys
    span its column groups and weights in ``fuse_group`` int32 / ``fuse_weight`` float32
    ``(B, H, capacity_blocks, d)`` (one layout). With ``key_states``/``value_states`` ``(B, H, n_new, d)`` the new
    rows are written into ``keys``/``values`` first, in the same launch (a static cache's whole update; rows past
    ``N`` are not written), else ``keys`` holds them already. A block that starts before ``start`` was grouped by an
    earlier call: its stored compact form is read instead of grouped again, so a decode step costs one key's
    ``d/G`` products, not a block's grouping. One launch, nothing allocated. Semantics of the reference in
    :func:`hf_distrattn.ops.reduce_keys`.
    """
    write = key_states is not None
    if not write:
        key_states = value_states = keys  # placeholders, never read
    batch, heads, capacity, d = keys.shape
    block = config.block_size
    _reduce_keys[((n_new - 1) // block + 2, batch * heads)](
        keys, values, key_states, value_states, hashes, start, reduced_keys, fuse_group, fuse_weight, n_new, heads,
        capacity, *keys.stride()[:3], *values.stride()[:3], *key_states.stride()[:3],
        *value_states.stride()[:3], *reduced_keys.stride()[:3], *fuse_group.stride()[:3], WRITE=write,
        RANK1=config.reduce == "rank1", BLOCK_M=block, D=d, G=config.group_size, DG=d // config.group_size,
        DG_PAD=reduced_keys.shape[-1], NH=hashes.shape[-1], PRECISION=_precision(keys.dtype),
        PDL=pdl(keys.get_device()), num_warps=4,
    )
