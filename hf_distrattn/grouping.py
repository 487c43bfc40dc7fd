r"""Block-wise LSH grouping of the head dimension: the DistrAttention approximation of ``Q·Kᵀ``.

The maths. Scores are a sum over the ``d`` head-dim columns, ``S = Q Kᵀ = Σ_c q_c k_cᵀ``. Split the rows
(tokens) of the *sampled* operand ``X`` (``Q`` by default) into blocks of ``block_size`` rows; inside a block,
sort the ``d`` columns so that alike columns sit together and cut them into ``d/G`` groups of ``G``. Within a
group ``g`` the block's columns are approximated by one rank-1 term, ``X[:, g] ≈ u_g v_gᵀ``
(``u_g`` a block column, ``v_g`` a ``G``-vector), so that for the other, *fused*, operand ``Y``:

    Σ_{c∈g} x_c y_cᵀ  ≈  u_g (Σ_{c∈g} v_{g,c} y_c)ᵀ  =  u_g ỹ_gᵀ,

and the score GEMM of a block, ``[u_1 … u_{d/G}] · [ỹ_1 … ỹ_{d/G}]ᵀ``, has inner size ``d/G`` instead of ``d``.
``reduce="sample"`` takes ``u_g`` = the group's first column and ``v_g = 1`` (keep one column, sum the other
operand's group); ``reduce="rank1"`` takes the best rank-1 fit (top eigenvector ``v_g`` of the ``G×G`` Gram
matrix ``X[:, g]ᵀ X[:, g]``, ``u_g = X[:, g] v_g``), which costs the same in the kernel and errs less.

Equivalently, ``u_g ỹ_gᵀ = (u_g v_gᵀ) Y[:, g]ᵀ``: the approximation is exact attention with ``X`` replaced by
``X̃`` whose group columns are ``u_g v_gᵀ``. :func:`approximate_operand` returns ``X̃``; the reference
attends with it, the kernels with the reduced ``d/G`` form (same numbers, fewer FLOPs).

Gradients (training). The grouping is a constant of the backward: the permutation, and the rank-1 directions
``v_g`` too, so that per block ``X̃ = X M`` with ``M = Σ_g v_g v_gᵀ`` (placed on the group's columns) a fixed
orthogonal projection and ``dX = dX̃ M``. Differentiating ``v_g`` as well would add the eigenvector derivative,
which grows like ``1/(λ₁ − λ₂)``: in near-degenerate groups, common on isotropic inputs, it made ``‖dQ‖`` 5 to
2,600 times the exact gradient's on an H100 benchmark, so it is left out (a straight-through on the directions).

Causal grouping. Grouping a block from all its rows makes row ``i``'s ``x̃_i`` depend on the rows after it
in the block: under a causal mask, later tokens would reach earlier positions (and a model fine-tuned through
the approximation learns to read them). With ``causal=True``, block ``b``'s permutation and directions come
from the rows of block ``b − 1`` (all earlier), ``u`` still from block ``b``'s own rows, and the first block is
exact (``X̃ = X``): every ``x̃_i`` is a function of rows ``≤ i`` only. Same kernel cost; the grouping is one
block stale, and calls with at most ``block_size`` rows are exact.

Ablations (``DistrConfig.grouping``): ``"random"`` groups the columns of each block by a seeded random
permutation; ``"truncate"`` keeps the first ``d/G`` columns and drops the rest (no grouping, no fuse);
``"match"`` is the yardstick LSH approximates: a greedy matching of the columns by ``|cos|`` (the rank-1 fit is
blind to a column's sign), pairs of pairs at the next level for ``G = 4`` and so on (:func:`match_permutation`;
``d/2 + d/4 + …`` sequential steps per block, reference only); ``"pca"`` drops the groups (below).

Projection (``grouping="pca"``). Grouping with the rank-1 reduction is the special case, with disjoint column
supports, of ``X̃ = X P Pᵀ`` for an orthonormal ``P`` (``d × d/G``); the kernels' cost is the same for any
``P`` (``U = X P``, the other operand fused by ``Wt = Pᵀ``). ``"pca"`` takes ``P`` = the top ``d/G``
eigenvectors of a covariance of the block's rows: without ``causal``, the block's own ``X_bᵀ X_b`` (the best
rank-``d/G`` fit of the block, Eckart–Young); with ``causal``, the decayed covariance of the blocks before it,
``C_b = Σ_{j<b} λ^{b−1−j} X_jᵀ X_j`` with ``λ = PCA_DECAY``. On a RoPE LM the column pairs that LSH forms on
block ``b − 1`` no longer fit block ``b`` (the phases have moved), while the leading subspace of the last few
hundred queries does. It needs a ``d × d`` eigendecomposition per block, which cuSOLVER does not batch for
``d > 32``: reference only, eigenvectors computed on the CPU in float64.

Grouping is locality-sensitive hashing of the columns of a block: each column ``x_c ∈ ℝ^{block_size}`` is
projected on ``num_hashes`` seeded Gaussian directions, the signs give a bucket code
``Σ_i [x_cᵀ r_i > 0] 2^i``, and columns are stably sorted by code (ties by column index). Columns in one
bucket point the same way (SimHash), so a group of consecutive sorted columns is nearly rank 1.
"""

from __future__ import annotations

import torch

from .config import DistrConfig

PCA_DECAY = 0.7
"""``λ`` of the causal ``"pca"`` covariance, per block (ref-llama-bytes, G=2, blocks of 64, two windows:
λ = 0.5 / 0.7 / 0.8 / 0.9 / 1 gave 1.762 / 1.746 / 1.755 / 1.772 / 1.786 bits/byte, exact 1.767; all 102 windows:
λ = 0.5 / 0.7 / 0.85 gave +2.6 / +1.9 / +2.1%)."""


def lsh_projections(block_size: int, num_hashes: int, seed: int, device, dtype) -> torch.Tensor:
    """The ``(block_size, num_hashes)`` Gaussian directions of the hash, drawn on the CPU for determinism."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(block_size, num_hashes, generator=generator, dtype=torch.float64).to(device, dtype)


def lsh_permutation(blocks: torch.Tensor, num_hashes: int, seed: int) -> torch.Tensor:
    """Column order of each block, alike columns adjacent.

    blocks: ``(..., n_blocks, block_size, d)``; returns int64 ``(..., n_blocks, d)``, a permutation of ``0..d-1``
    sorting the columns by LSH bucket code, ties broken by column index.
    """
    block_size, d = blocks.shape[-2:]
    r = lsh_projections(block_size, num_hashes, seed, blocks.device, blocks.dtype)
    bits = (blocks.transpose(-1, -2) @ r) > 0  # (..., d, num_hashes)
    weights = 2 ** torch.arange(num_hashes, device=blocks.device, dtype=torch.int64)
    code = (bits.to(torch.int64) * weights).sum(-1)
    return torch.argsort(code * d + torch.arange(d, device=blocks.device), dim=-1)


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[..., index, :]`` batched: rows ``index`` ``(..., k)`` of ``t`` ``(..., n, m)``."""
    return t.gather(-2, index[..., None].expand(*index.shape, t.shape[-1]))


def match_permutation(blocks: torch.Tensor, group_size: int) -> torch.Tensor:
    """Column order of each block from a greedy matching, groups of ``group_size`` adjacent.

    blocks: ``(..., block_size, d)``. Level 1 repeatedly takes the two unmatched columns of largest ``|cos|``; each
    pair is then represented by ``x̂_a ± x̂_b`` (unit columns, the sign of their cosine) and level 2 matches the
    pairs the same way, until groups hold ``group_size`` columns. Returns int64 ``(..., d)``, a permutation of
    ``0..d-1`` per block.
    """
    d = blocks.shape[-1]
    reps = blocks.transpose(-1, -2)  # (..., items, rows): one representative per group so far
    members = torch.arange(d, device=blocks.device)[:, None].expand(*blocks.shape[:-2], d, 1)
    while members.shape[-1] < group_size:
        unit = reps / reps.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        cos = unit @ unit.transpose(-1, -2)
        items = cos.shape[-1]
        free = torch.ones(cos.shape[:-1], dtype=torch.bool, device=cos.device)
        scores = cos.abs().masked_fill(torch.eye(items, dtype=torch.bool, device=cos.device), -1.0)
        firsts, seconds = [], []
        for _ in range(items // 2):
            flat = scores.masked_fill(~(free[..., :, None] & free[..., None, :]), -2.0).flatten(-2).argmax(-1)
            a, b = flat // items, flat % items
            free = free.scatter(-1, a[..., None], False).scatter(-1, b[..., None], False)
            firsts.append(a)
            seconds.append(b)
        a, b = torch.stack(firsts, -1), torch.stack(seconds, -1)  # (..., items/2)
        sign = torch.where(_rows(cos, a).gather(-1, b[..., None]) < 0, -1.0, 1.0)
        reps = _rows(unit, a) + sign * _rows(unit, b)
        members = torch.cat([_rows(members, a), _rows(members, b)], -1)
    return members.flatten(-2)


def top_eigenvector(gram: torch.Tensor, squarings: int = 8) -> torch.Tensor:
    """Unit top eigenvector of symmetric PSD ``(..., G, G)`` matrices, sign fixed so that ``Σ v ≥ 0``.

    ``C^(2^squarings) · 1`` by repeated squaring (each square rescaled by its trace): the other directions shrink
    by ``(λ₂/λ₁)^256``. Batched small matmuls only, where a batched eigensolver would need gigabytes of workspace
    on the GPU. A zero matrix gives ``1/√G``.
    """
    power = gram
    for _ in range(squarings):
        power = power @ power
        trace = power.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        power = power / torch.where(trace > 0, trace, torch.ones_like(trace))
    v = power.sum(-1)  # C^k · 1
    norm = v.norm(dim=-1, keepdim=True)
    v = torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), gram.shape[-1] ** -0.5)
    return torch.where(v.sum(-1, keepdim=True) < 0, -v, v)


def group_weights(grouped: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the weights that make ``u`` and those that fuse the other operand: grouped
    ``(..., rows, d/G, G)`` -> ``(u_weights, v)``, each ``(..., d/G, G)``, with ``u = Σ_i x_{g,i} u_weights_{g,i}``.

    ``"sample"``: ``u`` = the group's first column (``u_weights = e_0``), ``v = 1``. ``"rank1"``: both are the top
    eigenvector ``v`` of the group's Gram matrix (:func:`top_eigenvector`), so ``u vᵀ`` is the best rank-1 fit in
    Frobenius norm. Constants for autograd (see the module notes).
    """
    grouped = grouped.detach()
    if reduce == "sample":
        v = torch.ones_like(grouped[..., 0, :, :])
        return torch.zeros_like(v).index_fill_(-1, torch.tensor([0], device=v.device), 1.0), v
    v = top_eigenvector(torch.einsum("...mjg,...mjh->...jgh", grouped, grouped))
    return v, v


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` ``(batch, heads, seq, d)`` as ``(batch, heads, n_blocks, block, d)`` in float32 (float64 in), the last
    block zero-padded."""
    batch, heads, seq, d = x.shape
    n_blocks = -(-seq // block)
    padded = torch.nn.functional.pad(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32),
                                     (0, 0, 0, n_blocks * block - seq))
    return padded.view(batch, heads, n_blocks, block, d)


def group_blocks(x: torch.Tensor, config: DistrConfig,
                 causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouping and rank-1 factors of every block of ``x`` ``(batch, heads, seq, d)``, in float32 (float64 in).

    Returns ``perm`` int64 ``(batch, heads, n_blocks, d)`` (group ``j`` is columns ``perm[jG:(j+1)G]``),
    ``u`` ``(batch, heads, n_blocks * block_size, d/G)`` (rows past ``seq`` are zero) and ``v``
    ``(batch, heads, n_blocks, d/G, G)``. The last block may be short; its missing rows count as zeros.
    ``causal``: block ``b`` takes ``perm`` and ``v`` from block ``b − 1`` (block 0 from zeros: identity order,
    ``v = 1/√G``; :func:`approximate_operand` makes it exact).
    """
    group, block = config.group_size, config.block_size
    batch, heads, seq, d = x.shape
    blocks = as_blocks(x, block)
    n_blocks = blocks.shape[2]
    source = torch.nn.functional.pad(blocks, (0, 0, 0, 0, 1, -1)) if causal else blocks
    if config.grouping == "random":
        noise = torch.rand(blocks.shape[:-2] + (d,), generator=torch.Generator().manual_seed(config.seed))
        perm = torch.argsort(noise, dim=-1).to(x.device)
    elif config.grouping == "match":
        perm = match_permutation(source, group)
    else:
        perm = lsh_permutation(source, config.num_hashes, config.seed)

    def by_group(t):
        return t.gather(-1, perm.unsqueeze(-2).expand_as(t)).view(*t.shape[:-1], d // group, group)

    grouped = by_group(blocks)
    u_weights, v = group_weights(by_group(source) if causal else grouped, config.reduce)
    u = torch.einsum("...mjg,...jg->...mj", grouped, u_weights)
    return perm, u.reshape(batch, heads, n_blocks * block, d // group), v


def pca_bases(x: torch.Tensor, config: DistrConfig, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"pca"`` projection of every block of ``x`` ``(batch, heads, seq, d)`` (module notes).

    Returns the zero-padded blocks ``(batch, heads, n_blocks, block_size, d)`` and the orthonormal bases ``P``
    ``(batch, heads, n_blocks, d, d/G)``, both in float32 (float64 for float64 input). ``causal``: ``P`` of block
    ``b`` from blocks ``< b`` only (block 0's is arbitrary; :func:`approximate_operand` keeps block 0 exact).
    """
    blocks = as_blocks(x, config.block_size)
    n_blocks = blocks.shape[2]
    cov = (blocks.transpose(-1, -2) @ blocks).detach().to("cpu", torch.float64)
    if causal:  # C_b = Σ_{j<b} λ^(b-1-j) C_j, as one (n_blocks × n_blocks) weighting of the blocks
        lag = torch.arange(n_blocks)[:, None] - 1 - torch.arange(n_blocks)
        weights = torch.where(lag >= 0, PCA_DECAY ** lag.clamp_min(0).double(), 0.0)
        cov = torch.einsum("bj,...jxy->...bxy", weights, cov)
    basis = torch.linalg.eigh(cov).eigenvectors[..., -(x.shape[-1] // config.group_size):]  # ascending: top d/G
    return blocks, basis.to(x.device, blocks.dtype)


def approximate_operand(x: torch.Tensor, config: DistrConfig, causal: bool = False) -> torch.Tensor:
    """``X̃``: every block-group of ``x``'s columns replaced by its rank-1 factor product ``u_g v_gᵀ`` (``"pca"``:
    every block projected on its basis, ``X_b P Pᵀ``).

    x: ``(batch, heads, seq, d)``; returns the same shape in float32 (float64 for float64 input).
    ``causal``: the causal grouping of the module notes (first block exact).
    """
    x_c = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if config.group_size == 1:
        return x_c
    batch, heads, seq, d = x.shape
    if config.grouping == "truncate":
        out = torch.cat([x_c[..., : d // config.group_size], torch.zeros_like(x_c[..., d // config.group_size :])], -1)
    elif config.grouping == "pca":
        blocks, basis = pca_bases(x, config, causal)
        out = (blocks @ basis @ basis.transpose(-1, -2)).view(batch, heads, -1, d)[:, :, :seq]
    else:
        perm, u, v = group_blocks(x, config, causal)
        n_blocks = perm.shape[2]
        u = u.view(batch, heads, n_blocks, config.block_size, d // config.group_size)
        rebuilt = (u.unsqueeze(-1) * v.unsqueeze(-3)).flatten(-2)
        index = perm.unsqueeze(-2).expand_as(rebuilt)
        out = torch.empty_like(rebuilt).scatter_(-1, index, rebuilt).view(batch, heads, -1, d)[:, :, :seq]
    if causal:  # the first block exact
        out = torch.cat([x_c[:, :, : config.block_size], out[:, :, config.block_size :]], dim=2)
    return out
