r"""Block-wise LSH grouping of the head dimension: the DistrAttention approximation of ``Q·Kᵀ`` (reference form).

The maths. Scores are a sum over the ``d`` head-dim columns, ``S = Q Kᵀ = Σ_c q_c k_cᵀ``. Split the rows
(tokens) of the *sampled* operand ``X`` (``Q`` by default) into blocks of ``block_size`` rows; inside a block,
sort the ``d`` columns so that alike columns sit together and cut them into ``d/G`` groups of ``G``. Within a
group ``g`` the block's columns are approximated by one rank-1 term, ``X[:, g] ≈ u_g v_gᵀ`` with
``u_g = X[:, g] w_g`` (``w_g``, ``v_g`` two ``G``-vectors), so that for the other, *fused*, operand ``Y``:

    Σ_{c∈g} x_c y_cᵀ  ≈  u_g (Σ_{c∈g} v_{g,c} y_c)ᵀ  =  u_g ỹ_gᵀ,

and the score GEMM of a block, ``[u_1 … u_{d/G}] · [ỹ_1 … ỹ_{d/G}]ᵀ``, has inner size ``d/G`` instead of ``d``.
``reduce="sample"`` keeps the group's first column (``w_g = e_0``, ``v_g = 1``: the paper); ``reduce="rank1"``
the best rank-1 fit (``w_g = v_g`` = top eigenvector of the group's ``G×G`` Gram matrix ``X[:, g]ᵀ X[:, g]``),
which costs the same in the kernels and errs less.

One linear map per block. With the grouping held fixed, ``X̃_b = X_b M_b`` where ``M_b`` (``d × d``) is, in
bucket order, block-diagonal with the groups' ``w_g v_gᵀ`` (:func:`projections`); the approximation is exact
attention with ``X`` replaced by ``X̃``. The reference attends with ``X̃``, the kernels with the reduced ``d/G``
form (same numbers, fewer FLOPs). For rank-1 groups ``M_b = Σ_g v_g v_gᵀ`` is an orthogonal projection.

Gradients (training). The grouping is a constant of the backward: the permutation and the factors, so
``dX_b = dX̃_b M_bᵀ``. Differentiating ``v_g`` as well would add the eigenvector derivative, which grows like
``1/(λ₁ − λ₂)``: in near-degenerate groups, common on isotropic inputs, it made ``‖dQ‖`` 5 to 2,600 times the
exact gradient's on an H100 benchmark, so it is left out (a straight-through on the directions).

Causal grouping. Grouping a block from all its rows makes row ``i``'s ``x̃_i`` depend on the rows after it
in the block: under a causal mask, later tokens would reach earlier positions (and a model fine-tuned through
the approximation learns to read them). With ``causal=True``, block ``b``'s permutation and factors come from the
rows of block ``b − 1`` (all earlier), ``u`` still from block ``b``'s own rows, and the first block is exact
(``M_0 = I``): every ``x̃_i`` is a function of rows ``≤ i`` only. Same kernel cost; the grouping is one block
stale, and calls with at most ``block_size`` rows are exact.

The hash. Each column ``x_c ∈ ℝ^{block_size}`` of a block is projected on ``num_hashes`` random ``±1``
directions (Rademacher, :func:`hash_directions`: a counter-based integer hash of ``(seed, index)``, so the same
numbers on every device, with no random-number generator, and exact in 16-bit arithmetic); the signs give a
bucket code ``Σ_i [x_cᵀ r_i > 0] 2^i`` and columns are stably sorted by code (ties by column index). Columns in
one bucket point the same way (sign random projections), so a group of consecutive sorted columns is nearly
rank 1.

Ablations (``DistrConfig.grouping``): ``"random"`` groups the columns of each block by a seeded random
permutation; ``"truncate"`` keeps the first ``d/G`` columns and drops the rest (no grouping, no fuse);
``"match"`` is the yardstick LSH approximates: a greedy matching of the columns by ``|cos|`` (the rank-1 fit is
blind to a column's sign), pairs of pairs at the next level for ``G = 4`` and so on (:func:`match_permutation`;
``d/2 + d/4 + …`` sequential steps per block, reference only); ``"pca"`` drops the groups: ``M_b = P Pᵀ`` for
the top ``d/G`` eigenvectors ``P`` of a covariance of the block's rows (without ``causal``, the block's own
``X_bᵀ X_b``: its best rank-``d/G`` fit, Eckart–Young; with ``causal``, the decayed covariance of the blocks
before it, ``C_b = Σ_{j<b} λ^{b−1−j} X_jᵀ X_j``, ``λ = PCA_DECAY``). Rank-1 grouping is the special case of
``P`` with disjoint column supports, and the fused kernel's cost is the same for any ``P`` (``U = X P``, the
other operand fused by ``Wt = Pᵀ``: :func:`pca_reduced`); on a RoPE LM the column pairs LSH forms on block
``b − 1`` no longer fit block ``b`` (the phases have moved), while the leading subspace of the last few hundred
queries does. ``P`` comes from :func:`top_subspace`: matmuls and ``d/G × d/G`` Cholesky factorizations on the
device, no eigensolver (cuSOLVER does not batch ``d × d`` eigendecompositions above ``d = 32``).

Key subspaces (``grouping="subspace"``, keys sampled). Every key block ``c`` is reduced on its own rows, and
weighted by the queries at the same positions. The pair is sought that minimises the expected squared score error
``E (q (I − F Bᵀ) kᵀ)²`` over the block's queries and keys (``A`` the queries' second moments, summed over the
query heads that share the key head, over their mean eigenvalue, plus ``SUBSPACE_RIDGE``·I). The minimiser lives
in token space: the block's weighted scores ``S = Q K_cᵀ`` have ``Σ_h S_hᵀ S_h / mean + ridge K_c K_cᵀ = K_c A K_cᵀ
=: M`` (``BLOCK × BLOCK``), and the best rank-``r`` approximation of every row of ``S`` (Eckart–Young) is
``S U Uᵀ`` for the top ``r = d/G`` eigenvectors ``U`` of ``M``. It factors as a rank-``r`` score GEMM:
``q·(U Uᵀ K_c)ᵀ = (q F_c)·K̃_cᵀ`` with ``F_c = K_cᵀ U`` (``d × r``) and ``K̃_c = U`` (``BLOCK × r``), no inverse;
any orthonormal basis of the same span gives the same fit. With ``r ≥ BLOCK`` the fit is exact (``U = I``).
Only the queries of *later* blocks read a block reduced (its own queries score it exactly), and for them the top
eigenvectors of ``M`` are no better than one step of subspace iteration towards them: :func:`subspace_basis`
takes ``U = orth(M K_c E)``, ``E`` one-hot at the ``r`` coordinates of largest ``A_ii (C_k)_ii`` (``C_k = K_cᵀ K_c``;
the head-dim coordinates where the block's keys, weighted by its queries, carry the most energy), computed right
to left in ``d``-space as ``M K_c E = K_c (A (C_k E))`` with ``A`` applied head by head (``Σ_h Q_hᵀ (Q_h Z)``: no
``d × d`` or ``BLOCK × BLOCK`` matrix is formed), and ``orth`` Newton–Schulz (:func:`orthonormalized`: products
only, and a right multiplication, so the span is kept). ``A = I`` would give the keys' principal directions;
weighting by the queries keeps the directions the scores use. The gradient holds ``U`` constant: ``dK_c = U Uᵀ dK̃_c``.

Which pairs are reduced. Query ``i`` reads key block ``c`` reduced only when ``c`` lies wholly before ``i``'s own
block, so every number it reads comes from earlier positions: causal, and never stale (``"pca"`` on queries must
group block ``b`` by the blocks before it). It scores its own block and its neighbours exactly (the diagonal
tile, where most attention goes, and the previous block: recent keys; the next one too without a causal mask),
the first block exactly (attention sinks: most LMs put much of every query's attention on the first tokens), and
the blocks its sliding window cuts. At square tiles an exact tile costs what a reduced one does at G=2, so this
costs nothing there (SmolLM2, C headers, G=4: +7.2% bits/byte with the own block alone, +4.4% with its
neighbours, +4.0% with two blocks before it). Pairing key blocks with the queries at their positions
needs as many queries as keys (prefill, training, encoders); other calls run exact
(:func:`hf_distrattn.plan.effective_group_size`). Accuracy against the other groupings: docs/design.md (D10).
"""

from __future__ import annotations

import torch

from .config import DistrConfig

PCA_DECAY = 0.7
"""``λ`` of the causal ``"pca"`` covariance, per block (ref-llama-bytes, G=2, blocks of 64, two windows:
λ = 0.5 / 0.7 / 0.8 / 0.9 / 1 gave 1.762 / 1.746 / 1.755 / 1.772 / 1.786 bits/byte, exact 1.767)."""
PCA_ITERATIONS = 4
"""Subspace iterations of :func:`top_subspace` (G=2, two 2048-token windows, mean loss against exact
eigenvectors: ref-llama-bytes 2 / 4 / 8 iterations +0.6 / +0.2 / −0.0%, SmolLM2 on C headers −0.9 / +0.1 /
+0.5%)."""

SUBSPACE_RIDGE = 1e-3
"""Ridge added to ``C_q`` of ``"subspace"``, relative to its mean eigenvalue; it keeps ``A`` positive definite
for blocks of padding. (SmolLM2, first 2048 tokens, G=2 / G=4 bits/byte against exact: ridge 1e-3 +0.19% /
+6.74% on C headers, −0.10% / +0.31% on prose; ridge 1: +0.19% / +6.75%, −0.03% / +0.46%, though it lowers the
later queries' score error by a third; docs/design.md.)"""
SUBSPACE_STEPS = 14
SUBSPACE_FINISH = 4
"""Quintic Newton–Schulz steps and cubic steps after them that orthonormalise ``M K_c E`` in
:func:`subspace_basis`: its condition number reaches 1e6-1e8 (every column leans on ``M``'s top eigenvectors), and
each quintic step lifts the smallest singular values by about 3.4×, so 10 steps leave some columns short
(SmolLM2, four layers' blocks, later queries' relative score error G=2: 1.40e-3 with 14 steps, 1.52e-3 with 10,
against a float64 QR's 1.40e-3; three full iterations, 1.46e-3; docs/design.md)."""

_MASK32 = 0xFFFFFFFF
_HASH_CACHE: dict[tuple, torch.Tensor] = {}


def _mul32(x, c: int):
    """``x · c mod 2³²`` for ``x`` in ``[0, 2³²)`` (Python int or int64 tensor) without leaving int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """A 32-bit integer finalizer (``lowbias32``): well-mixed bits of ``x`` in ``[0, 2³²)``; ints or tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_hash(count: int, seed: int, stream: int, device) -> torch.Tensor:
    """int64 ``(count,)`` of well-mixed 32-bit values: element ``i`` is ``mix32(mix32(i + key) ^ key)`` with
    ``key = mix32(seed·2654435761 + stream mod 2³²)``. Deterministic, traceable, the same on every device."""
    key = mix32((seed * 2654435761 + stream) & _MASK32)
    i = torch.arange(count, device=device, dtype=torch.int64)
    return mix32(mix32((i + key) & _MASK32) ^ key)


def padded_width(n: int) -> int:
    """The tile width for ``n`` columns: the smallest power of two ``≥ n`` and ``≥ 16`` (``tl.dot``'s minimum)."""
    return max(16, 1 << (n - 1).bit_length())


def hash_directions(block_size: int, num_hashes: int, seed: int, device) -> torch.Tensor:
    """The hash's ``(block_size, padded_width(num_hashes))`` float32 directions: ``±1`` in the first ``num_hashes``
    columns (entry ``(i, j)`` from bit 31 of ``counter_hash`` at ``i·num_hashes + j``), zeros after them (a zero
    column gives bit 0, so the padding changes no code). Made once per setting and device in eager code; under
    ``torch.compile`` the same ops are traced."""
    key = (block_size, num_hashes, seed, torch.device(device))
    cached = None if torch.compiler.is_compiling() else _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    bits = counter_hash(block_size * num_hashes, seed, 0, device) >> 31
    signs = (1 - 2 * bits).to(torch.float32).view(block_size, num_hashes)
    directions = torch.nn.functional.pad(signs, (0, padded_width(num_hashes) - num_hashes))
    if not torch.compiler.is_compiling():
        _HASH_CACHE[key] = directions
    return directions


def lsh_permutation(blocks: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """Column order of each block, alike columns adjacent.

    blocks: ``(..., n_blocks, block_size, d)``; hashes: :func:`hash_directions` for ``block_size``. Returns int64
    ``(..., n_blocks, d)``, a permutation of ``0..d-1`` sorting the columns by bucket code, ties by column index.
    """
    d = blocks.shape[-1]
    bits = (blocks.transpose(-1, -2) @ hashes.to(blocks.dtype)) > 0  # (..., d, padded_width(num_hashes))
    weights = 2 ** torch.arange(hashes.shape[-1], device=blocks.device, dtype=torch.int64)
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


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` ``(batch, heads, seq, d)`` as ``(batch, heads, n_blocks, block, d)`` in float32 (float64 in), the last
    block zero-padded."""
    batch, heads, seq, d = x.shape
    n_blocks = -(-seq // block)
    padded = torch.nn.functional.pad(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32),
                                     (0, 0, 0, n_blocks * block - seq))
    return padded.view(batch, heads, n_blocks, block, d)


def previous_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Block ``b − 1`` at position ``b`` (zeros at 0): the causal grouping's source blocks."""
    return torch.nn.functional.pad(blocks, (0, 0, 0, 0, 1, -1))


def block_grouping(source: torch.Tensor, config: DistrConfig,
                   hashes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouping of each block of ``source`` ``(..., n_blocks, block, d)``: ``(perm, w, v)`` with ``perm`` int64
    ``(..., n_blocks, d)`` (group ``j`` is columns ``perm[jG:(j+1)G]``) and the factors ``w``, ``v``
    ``(..., n_blocks, d/G, G)`` (``u_j = X[:, group j] · w_j``; the fused operand's group summed with weights
    ``v_j``). ``hashes``: :func:`hash_directions` (made here when ``None``). Constants for autograd."""
    source = source.detach()
    d, group = source.shape[-1], config.group_size
    if config.grouping == "random":
        noise = counter_hash(source[..., 0, :].numel(), config.seed, 1, source.device).view(source.shape[:-2] + (d,))
        perm = torch.argsort(noise * d + torch.arange(d, device=source.device), dim=-1)
    elif config.grouping == "match":
        perm = match_permutation(source, group)
    else:
        if hashes is None:
            hashes = hash_directions(config.block_size, config.num_hashes, config.seed, source.device)
        perm = lsh_permutation(source, hashes)
    grouped = source.gather(-1, perm.unsqueeze(-2).expand_as(source)).view(*source.shape[:-1], d // group, group)
    if config.reduce == "sample":
        v = torch.ones_like(grouped[..., 0, :, :])
        w = torch.zeros_like(v)
        w[..., 0] = 1.0
        return perm, w, v
    v = top_eigenvector(torch.einsum("...mjg,...mjh->...jgh", grouped, grouped))
    return perm, v, v


def group_blocks(x: torch.Tensor, config: DistrConfig, causal: bool = False,
                 hashes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouping and reduced form of every block of ``x`` ``(batch, heads, seq, d)``, in float32 (float64 in).

    Returns ``perm`` int64 ``(batch, heads, n_blocks, d)``, ``u`` ``(batch, heads, n_blocks * block_size, d/G)``
    (rows past ``seq`` are zero) and the fuse weights ``v`` ``(batch, heads, n_blocks, d/G, G)``. ``causal``: block
    ``b`` grouped by block ``b − 1`` (block 0 by zeros).
    """
    blocks = as_blocks(x, config.block_size)
    perm, w, v = block_grouping(previous_blocks(blocks) if causal else blocks, config, hashes)
    group = config.group_size
    grouped = blocks.gather(-1, perm.unsqueeze(-2).expand_as(blocks)).unflatten(-1, (-1, group))
    u = torch.einsum("...mjg,...jg->...mj", grouped, w)
    return perm, u.flatten(2, 3), v


def compact_fuse(perm: torch.Tensor, v: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fuse matrix ``Wt`` (``d/G × d``, ``Wt[j, perm[jG+i]] = v[j, i]``) in compact form: each column's group
    int32 and weight float32, ``(..., d)`` each."""
    position = torch.argsort(perm, dim=-1)  # column c sits at position[c] in bucket order
    return (position // group_size).to(torch.int32), v.flatten(-2).gather(-1, position).to(torch.float32)


def top_subspace(cov: torch.Tensor, rank: int, iterations: int = PCA_ITERATIONS) -> torch.Tensor:
    """An orthonormal basis ``(..., d, rank)`` of the leading ``rank``-dimensional invariant subspace of symmetric
    PSD ``cov`` ``(..., d, d)``: subspace iteration ``P ← orth(C P)`` from the ``rank`` coordinates of largest
    variance, orthonormalised by CholeskyQR2 (columns scaled first; float64, whatever ``cov``'s dtype). A zero
    matrix gives zero columns."""
    cov = cov.to(torch.float64)
    order = torch.argsort(cov.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)[..., :rank]
    p = torch.nn.functional.one_hot(order, cov.shape[-1]).transpose(-1, -2).to(torch.float64)
    eye = torch.eye(rank, dtype=torch.float64, device=cov.device)
    for _ in range(iterations):
        p = cov @ p
        p = p / p.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        for _ in range(2):
            factor = torch.linalg.cholesky(p.transpose(-1, -2) @ p + 1e-12 * eye)
            p = torch.linalg.solve_triangular(factor, p.transpose(-1, -2), upper=False).transpose(-1, -2)
    return p


def _pca_bases(blocks: torch.Tensor, config: DistrConfig, causal: bool) -> torch.Tensor:
    """Orthonormal ``P`` ``(..., n_blocks, d, d/G)`` of ``"pca"`` (module notes), in ``blocks``' dtype."""
    n_blocks = blocks.shape[2]
    cov = (blocks.transpose(-1, -2) @ blocks).detach().to(torch.float64)
    if causal:  # C_b = Σ_{j<b} λ^(b-1-j) C_j, as one (n_blocks × n_blocks) weighting of the blocks
        lag = torch.arange(n_blocks, device=blocks.device)[:, None] - 1 - torch.arange(n_blocks, device=blocks.device)
        weights = torch.where(lag >= 0, PCA_DECAY ** lag.clamp_min(0).double(), 0.0)
        cov = torch.einsum("bj,...jxy->...bxy", weights, cov)
    return top_subspace(cov, blocks.shape[-1] // config.group_size).to(blocks.dtype)


def pca_reduced(x: torch.Tensor, config: DistrConfig, causal: bool, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``"pca"`` in the fused kernel's form: ``U`` ``(B, H, n_blocks·block, width)`` (``U_b = X_b P_b``) and ``Wt``
    ``(B, H, n_blocks, width, d)`` (``P_bᵀ``), in ``x``'s dtype, zero past ``d/G``. ``causal``: block 0's is unused
    (the kernel computes block 0 exactly)."""
    blocks = as_blocks(x, config.block_size)
    basis = _pca_bases(blocks, config, causal)
    pad = width - basis.shape[-1]
    u = torch.nn.functional.pad(blocks @ basis, (0, pad)).flatten(2, 3).to(x.dtype)
    wt = torch.nn.functional.pad(basis.transpose(-1, -2), (0, 0, 0, pad)).to(x.dtype)
    return u.contiguous(), wt.contiguous()


def orthonormalized(x: torch.Tensor, steps: int, finish: int = 0) -> torch.Tensor:
    """``x`` ``(..., n, r)`` after Frobenius normalisation, ``steps`` Newton–Schulz steps of the quintic
    ``X ← aX + X(bXᵀX + c(XᵀX)²)`` (Muon's coefficients: singular values above about ``3.4⁻ˢᵗᵉᵖˢ`` of the largest
    land in ``[0.7, 1.2]``) and ``finish`` steps of the cubic ``X ← X(3I − XᵀX)/2`` (those then converge to one).
    Same span, products only; a zero column stays zero."""
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    for _ in range(steps):
        gram = x.transpose(-1, -2) @ x
        x = 3.4445 * x + x @ (-4.7750 * gram + 2.0315 * gram @ gram)
    for _ in range(finish):
        x = 1.5 * x - 0.5 * x @ (x.transpose(-1, -2) @ x)
    return x


def subspace_basis(q: torch.Tensor, k: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """``U`` of ``"subspace"`` (module notes) for every key block: ``(batch, Hkv, n_blocks, block, r)`` with
    ``r = min(d/G, block)``, orthonormal columns in token space spanning ``M K_c E = K_c (A (C_k E))``, float32
    (float64 in); ``q`` ``(batch, Hq, n, d)`` and ``k`` ``(batch, Hkv, n, d)`` hold the same positions. PyTorch
    reference of :func:`hf_distrattn.kernels.subspace.subspace_reduced`. A constant of autograd."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks_q, blocks_k = as_blocks(q.detach(), config.block_size), as_blocks(k.detach(), config.block_size)
    batch, h_kv, n_blocks, rows, d = blocks_k.shape
    rank = d // config.group_size
    if rank >= rows:  # the block's scores have rank ≤ rows: U = I is exact
        return torch.eye(rows, dtype=dtype, device=k.device).expand(batch, h_kv, n_blocks, rows, rows)
    blocks_q = blocks_q.to(dtype).view(batch, h_kv, -1, n_blocks, rows, d)
    blocks_k = blocks_k.to(dtype)
    q_energy = blocks_q.square().sum((2, 4))  # diag(Σ_h Q_hᵀ Q_h)
    mean = q_energy.sum(-1, keepdim=True) / d  # tr(C_q) / d
    weight = torch.where(mean > 0, mean, 1.0)
    energy = (q_energy / weight + SUBSPACE_RIDGE) * blocks_k.square().sum(-2)  # A_ii (C_k)_ii
    order = torch.argsort(energy, dim=-1, descending=True, stable=True)[..., :rank]
    start = blocks_k @ torch.nn.functional.one_hot(order, d).transpose(-1, -2).to(dtype)  # K_c E
    z = blocks_k.transpose(-1, -2) @ start  # C_k E
    weighted = (blocks_q.transpose(-1, -2) @ (blocks_q @ z.unsqueeze(2))).sum(2)  # Σ_h Q_hᵀ Q_h C_k E
    y = weighted / weight[..., None] + SUBSPACE_RIDGE * z  # A C_k E
    return orthonormalized(blocks_k @ y, SUBSPACE_STEPS, SUBSPACE_FINISH)


def subspace_keys(k: torch.Tensor, basis: torch.Tensor, config: DistrConfig) -> torch.Tensor:
    """``K̃``: every key block projected on its ``basis`` in token space, ``K̃_c = U_c U_cᵀ K_c`` (``q·k̃`` is the
    reduced score), ``(batch, Hkv, n, d)`` in ``basis``' dtype. Differentiable in ``k`` with ``U`` held constant:
    ``dK_c = U_c U_cᵀ dK̃_c``."""
    blocks = as_blocks(k, config.block_size).to(basis.dtype)
    return (basis @ (basis.transpose(-1, -2) @ blocks)).flatten(2, 3)[:, :, : k.shape[2]]


def projections(x: torch.Tensor, config: DistrConfig, causal: bool = False,
                hashes: torch.Tensor | None = None) -> torch.Tensor:
    """``M_b`` of every block of ``x`` ``(batch, heads, seq, d)``: ``(batch, heads, n_blocks, d, d)`` in float32
    (float64 in) with ``X̃_b = X_b M_b`` (module notes); ``causal``: grouped by the previous block, ``M_0 = I``.
    A constant of autograd."""
    blocks = as_blocks(x.detach(), config.block_size)
    d, group = x.shape[-1], config.group_size
    eye = torch.eye(d, device=x.device, dtype=blocks.dtype)
    if group == 1:
        return eye.expand(*blocks.shape[:3], d, d)
    if config.grouping == "truncate":
        m = torch.diag((torch.arange(d, device=x.device) < d // group).to(blocks.dtype))
        m = m.expand(*blocks.shape[:3], d, d)
    elif config.grouping == "pca":
        basis = _pca_bases(blocks, config, causal)
        m = basis @ basis.transpose(-1, -2)
    else:
        perm, w, v = block_grouping(previous_blocks(blocks) if causal else blocks, config, hashes)
        groups = torch.eye(d // group, device=x.device, dtype=blocks.dtype)
        dense = torch.einsum("...ja,...jb,jk->...jakb", w, v, groups).reshape(*perm.shape, d)  # bucket order
        one_hot = torch.nn.functional.one_hot(perm, d).to(blocks.dtype)  # one_hot[k, c] = [perm_k = c]
        m = one_hot.transpose(-1, -2) @ dense @ one_hot
    if causal:
        m = torch.cat([eye.expand(*m.shape[:2], 1, d, d), m[:, :, 1:]], dim=2)
    return m


def approximate_operand(x: torch.Tensor, config: DistrConfig, causal: bool = False,
                        hashes: torch.Tensor | None = None) -> torch.Tensor:
    """``X̃``: every block of ``x`` ``(batch, heads, seq, d)`` times its :func:`projections` ``M_b``, in float32
    (float64 for float64 input). Differentiable in ``x`` with the grouping held constant: ``dX = dX̃ Mᵀ``."""
    blocks = as_blocks(x, config.block_size)
    if config.group_size == 1:
        return blocks.flatten(2, 3)[:, :, : x.shape[2]]
    out = blocks @ projections(x, config, causal, hashes)
    return out.flatten(2, 3)[:, :, : x.shape[2]]
