r"""``grouping="subspace"``'s pre-pass in Triton: :func:`hf_distrattn.grouping.subspace_basis` with one key block per
program, every product on the tensor cores, nothing written but the results.

For key block ``c`` (``K_c``, ``BLOCK × D``) and the queries at its positions of the ``kv_group`` query heads that
share its key head (``Q_h``):

1. ``M = Σ_h S_hᵀ S_h / (tr C_q / d) + ridge · K_c K_cᵀ`` with ``S_h = Q_h K_cᵀ`` (``BLOCK × BLOCK``, float32);
2. the start ``K_c E``: ``K_c``'s columns at the ``r`` coordinates of largest ``A_ii (K_cᵀ K_c)_ii`` (ties by
   index), ``E`` one-hot by ranking those ``D`` energies against each other (``D × D`` comparisons, no sort);
3. ``ITERATIONS`` steps of ``U ← orth(M U)``, ``orth`` being Newton–Schulz: Frobenius normalisation, ``STEPS``
   quintic steps, and after the last iteration ``FINISH`` cubic ones
   (:func:`hf_distrattn.grouping.orthonormalized`).

Then ``F_c = K_cᵀ U`` and the outputs: ``U`` (float32), and the fused kernel's ``K̃_c = U`` and ``F_c`` in ``k``'s
dtype, zero past ``r``. With ``r ≥ BLOCK`` there is no iteration: ``U = I``, exact. 16-bit
inputs multiply in TF32 after ``S_h`` (the products are float32 matrices), float32 inputs in IEEE float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import DistrConfig
from ..grouping import SUBSPACE_FINISH, SUBSPACE_ITERATIONS, SUBSPACE_RIDGE, SUBSPACE_STEPS


@triton.jit
def _quintic(x, STEPS: tl.constexpr, PRECISION: tl.constexpr):
    x = x / tl.maximum(tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0)), 1e-30)
    for _ in range(STEPS):
        gram = tl.dot(tl.trans(x), x, input_precision=PRECISION)
        poly = -4.7750 * gram + 2.0315 * tl.dot(gram, gram, input_precision=PRECISION)
        x = 3.4445 * x + tl.dot(x, poly, input_precision=PRECISION)
    return x


@triton.jit
def _basis(Q, K, U, KR, F, ridge, n, h_kv, kv_group, n_blocks, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
           BLOCK: tl.constexpr, D: tl.constexpr, R: tl.constexpr, WIDTH: tl.constexpr, ITERATIONS: tl.constexpr,
           STEPS: tl.constexpr, FINISH: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    c = pid % n_blocks
    bh = pid // n_blocks
    b = bh // h_kv
    hk = bh % h_kv
    rows = c * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    inside = rows[:, None] < n
    k = tl.load(K + b * sk_b + hk * sk_h + rows[:, None] * sk_n + offs_d[None, :], mask=inside, other=0.0)
    m = tl.zeros([BLOCK, BLOCK], tl.float32)
    q_energy = tl.zeros([D], tl.float32)
    for r in range(0, kv_group):
        q = tl.load(Q + b * sq_b + (hk * kv_group + r) * sq_h + rows[:, None] * sq_n + offs_d[None, :], mask=inside,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # S_h = Q_h K_cᵀ
        m += tl.dot(tl.trans(s), s, input_precision=PRECISION)
        qf = q.to(tl.float32)
        q_energy += tl.sum(qf * qf, axis=0)
    mean = tl.sum(q_energy, axis=0) / D
    weight = tl.where(mean > 0, mean, 1.0)
    m = m / weight + ridge * tl.dot(k, tl.trans(k), input_precision=PRECISION)
    i = tl.arange(0, BLOCK)
    cols = tl.arange(0, WIDTH)
    kf = k.to(tl.float32)
    if ITERATIONS == 0:
        basis = tl.where(i[:, None] == cols[None, :], 1.0, 0.0)
    else:
        energy = (q_energy / weight + ridge) * tl.sum(kf * kf, axis=0)  # A_ii (K_cᵀ K_c)_ii
        before = (energy[None, :] > energy[:, None]) | ((energy[None, :] == energy[:, None])
                                                        & (offs_d[None, :] < offs_d[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)  # coordinate i's place in the descending order
        pick = tl.where((rank[:, None] == cols[None, :]) & (cols[None, :] < R), 1.0, 0.0)  # (D, WIDTH)
        basis = tl.dot(kf, pick, input_precision=PRECISION)
    for _ in range(ITERATIONS):  # loops, not unrolled: a few hundred small products otherwise
        basis = _quintic(tl.dot(m, basis, input_precision=PRECISION), STEPS, PRECISION)
    for _ in range(FINISH if ITERATIONS > 0 else 0):
        gram = tl.dot(tl.trans(basis), basis, input_precision=PRECISION)
        basis = 1.5 * basis - 0.5 * tl.dot(basis, gram, input_precision=PRECISION)
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
    n_blocks = triton.cdiv(n, block)
    basis = torch.empty(batch, h_kv, n_blocks, block, rank, device=q.device, dtype=torch.float32)
    reduced = torch.empty(batch, h_kv, n_blocks * block, width, device=q.device, dtype=k.dtype)
    factors = torch.empty(batch, h_kv, n_blocks, d, width, device=q.device, dtype=k.dtype)
    _basis[(batch * h_kv * n_blocks,)](
        q, k, basis, reduced, factors, SUBSPACE_RIDGE, n, h_kv, h_q // h_kv, n_blocks, *q.stride()[:3],
        *k.stride()[:3], BLOCK=block, D=d, R=rank, WIDTH=width,
        ITERATIONS=SUBSPACE_ITERATIONS if rank < block else 0, STEPS=SUBSPACE_STEPS, FINISH=SUBSPACE_FINISH,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return reduced, factors, basis
