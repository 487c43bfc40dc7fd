r"""``grouping="subspace"``'s pre-pass in Triton: :func:`hf_distrattn.grouping.subspace_basis` with one key block per
program, every product on the tensor cores, nothing written but the results.

For key block ``c`` (``K_c``, ``BLOCK × D``) and the queries at its positions of the ``kv_group`` query heads that
share its key head (``Q_h``), with ``mean = Σ_h ‖Q_h‖² / D``:

1. the start ``K_c E``: ``K_c``'s columns at the ``r`` coordinates of largest ``A_ii (C_k)_ii``, ``A_ii =
   Σ_h (Q_hᵀ Q_h)_ii / mean + ridge`` (ties by index), ``E`` one-hot by ranking those ``D`` energies against each
   other (``D × D`` comparisons, no sort);
2. one step of subspace iteration, right to left: ``Z = K_cᵀ (K_c E)``, ``Y = Σ_h Q_hᵀ (Q_h Z) / mean + ridge·Z``,
   ``X = K_c Y`` (``= M K_c E``; with ``F_c`` below, four ``BLOCK × D × r`` products per block and two per query
   head, besides Newton–Schulz);
3. ``U = orth(X)``: Frobenius normalisation, ``STEPS`` quintic Newton–Schulz steps, ``FINISH`` cubic ones
   (:func:`hf_distrattn.grouping.orthonormalized`).

Then ``F_c = K_cᵀ U`` and the outputs: ``U`` (float32), and the fused kernel's ``K̃_c = U`` and ``F_c`` in ``k``'s
dtype, zero past ``r``. With ``r ≥ BLOCK`` (``EXACT``) there is no iteration: ``U = I``. 16-bit inputs multiply
in TF32 (the products are float32 matrices), except ``K_c E`` and ``K_cᵀ (K_c E)``, which take ``K_c`` in its own
dtype (``K_c E`` is a choice of ``K_c``'s columns, so both are exact either way, at twice TF32's rate); float32
inputs in IEEE float32. The query heads are read twice
(their energies choose ``E``, which the products need).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..grouping import SUBSPACE_FINISH, SUBSPACE_RIDGE, SUBSPACE_STEPS
from .launch import cdiv


@triton.jit
def _orthonormalized(x, STEPS: tl.constexpr, FINISH: tl.constexpr, PRECISION: tl.constexpr):
    x = x / tl.maximum(tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0)), 1e-30)
    for _ in range(STEPS):  # loops, not unrolled: compile time
        gram = tl.dot(tl.trans(x), x, input_precision=PRECISION)
        poly = -4.7750 * gram + 2.0315 * tl.dot(gram, gram, input_precision=PRECISION)
        x = 3.4445 * x + tl.dot(x, poly, input_precision=PRECISION)
    for _ in range(FINISH):
        gram = tl.dot(tl.trans(x), x, input_precision=PRECISION)
        x = 1.5 * x - 0.5 * tl.dot(x, gram, input_precision=PRECISION)
    return x


@triton.jit
def _basis(Q, K, U, KR, F, ridge, n, h_kv, kv_group, n_blocks, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
           BLOCK: tl.constexpr, D: tl.constexpr, R: tl.constexpr, WIDTH: tl.constexpr, EXACT: tl.constexpr,
           STEPS: tl.constexpr, FINISH: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    c = pid % n_blocks
    bh = (pid // n_blocks).to(tl.int64)  # batch and head offsets in 64 bits (prefill's notes)
    b = bh // h_kv
    hk = bh % h_kv
    rows = c * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    i = tl.arange(0, BLOCK)
    cols = tl.arange(0, WIDTH)
    inside = rows[:, None] < n
    kx = tl.load(K + b * sk_b + hk * sk_h + rows[:, None] * sk_n + offs_d[None, :], mask=inside, other=0.0)
    kf = kx.to(tl.float32)
    if EXACT:
        basis = tl.where(i[:, None] == cols[None, :], 1.0, 0.0)
    else:
        q_rows = Q + b * sq_b + rows[:, None] * sq_n + offs_d[None, :]
        q_energy = tl.zeros([D], tl.float32)
        for r in range(0, kv_group):
            qf = tl.load(q_rows + (hk * kv_group + r) * sq_h, mask=inside, other=0.0).to(tl.float32)
            q_energy += tl.sum(qf * qf, axis=0)
        mean = tl.sum(q_energy, axis=0) / D
        weight = tl.where(mean > 0, mean, 1.0)
        energy = (q_energy / weight + ridge) * tl.sum(kf * kf, axis=0)  # A_ii (K_cᵀ K_c)_ii
        before = (energy[None, :] > energy[:, None]) | ((energy[None, :] == energy[:, None])
                                                        & (offs_d[None, :] < offs_d[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)  # coordinate i's place in the descending order
        pick = tl.where((rank[:, None] == cols[None, :]) & (cols[None, :] < R), 1.0, 0.0)  # E (D, WIDTH)
        start = tl.dot(kx, pick.to(kx.dtype), input_precision=PRECISION).to(kx.dtype)  # K_c E: columns of K_c, exact
        z = tl.dot(tl.trans(kx), start, input_precision=PRECISION)  # C_k E
        y = tl.zeros([D, WIDTH], tl.float32)
        for r in range(0, kv_group):
            qf = tl.load(q_rows + (hk * kv_group + r) * sq_h, mask=inside, other=0.0).to(tl.float32)
            y += tl.dot(tl.trans(qf), tl.dot(qf, z, input_precision=PRECISION), input_precision=PRECISION)
        y = y / weight + ridge * z  # A C_k E
        basis = _orthonormalized(tl.dot(kf, y, input_precision=PRECISION), STEPS, FINISH, PRECISION)
    factor = tl.dot(tl.trans(kf), basis, input_precision=PRECISION)  # F_c = K_cᵀ U
    block = pid.to(tl.int64)
    tl.store(U + (block * BLOCK + i[:, None]) * R + cols[None, :], basis, mask=cols[None, :] < R)
    tl.store(KR + (block * BLOCK + i[:, None]) * WIDTH + cols[None, :], basis.to(KR.dtype.element_ty))
    tl.store(F + (block * D + offs_d[:, None]) * WIDTH + cols[None, :], factor.to(F.dtype.element_ty))


def subspace_reduced(q: torch.Tensor, k: torch.Tensor, config: DistrConfig,
                     width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K̃, F, U)`` of ``"subspace"`` for every key block (module notes): ``K̃`` ``(batch, Hkv, n_blocks·block,
    width)`` and ``F`` ``(batch, Hkv, n_blocks, d, width)`` in ``k``'s dtype, zero past ``r = min(d/G, block)``, as
    the fused kernel reads them; ``U`` ``(batch, Hkv, n_blocks, block, r)`` float32, the basis of
    :func:`hf_distrattn.grouping.subspace_basis` (the same algorithm in PyTorch). ``q`` ``(batch, Hq, n, d)``,
    ``k`` ``(batch, Hkv, n, d)``: unit-stride, power-of-two head dims."""
    batch, h_q, n, d = q.shape
    h_kv, block = k.shape[1], config.block_size
    rank = min(d // config.group_size, block)
    n_blocks = cdiv(n, block)
    basis = torch.empty(batch, h_kv, n_blocks, block, rank, device=q.device, dtype=torch.float32)
    reduced = torch.empty(batch, h_kv, n_blocks * block, width, device=q.device, dtype=k.dtype)
    factors = torch.empty(batch, h_kv, n_blocks, d, width, device=q.device, dtype=k.dtype)
    _basis[(batch * h_kv * n_blocks,)](
        q, k, basis, reduced, factors, SUBSPACE_RIDGE, n, h_kv, h_q // h_kv, n_blocks, *q.stride()[:3],
        *k.stride()[:3], BLOCK=block, D=d, R=rank, WIDTH=width, EXACT=rank >= block, STEPS=SUBSPACE_STEPS,
        FINISH=SUBSPACE_FINISH, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=2)
    return reduced, factors, basis
