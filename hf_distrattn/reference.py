r"""Plain-PyTorch attention: the oracle of every kernel test and the CPU implementation of the ops.

Forward, in float32 (float64 for float64 input), with ``X̃ = X M`` of :mod:`hf_distrattn.grouping` for the
sampled operand (``M = I`` when ``group_size == 1``)::

    A = scale · Q̃ K̃ᵀ,   S = c · tanh(A / c) + bias,   P = softmax(S),   out = P V,   lse = log Σ exp S

with logit softcapping ``c`` (``S = A + bias`` without it); ``bias`` holds the mask, causality (key ``j`` after
query position ``i``) and a sliding window of ``W`` keys (``i − j ≥ W``), query ``i`` of ``Nq`` at position
``i + Nk − Nq`` (bottom-right). Backward (:func:`attention_backward`), FlashAttention's formulas with ``P``
recomputed, ``Δ = rowsum(dO ∘ O) − dlse`` (``dlse``: the gradient reaching the log-sum-exp, zero unless a caller
uses it, as attention sinks do) and ``T = tanh(A / c)``::

    dV = Pᵀ dO,   dS = P ∘ (dO Vᵀ − Δ),   dA = dS ∘ (1 − T²),   dQ̃ = scale · dA K̃,   dK̃ = scale · dAᵀ Q̃,
    dX = dX̃ Mᵀ

With ``grouping="subspace"`` the keys stay whole and ``A`` takes ``Q K̃ᵀ`` outside the exactly scored pairs
(:func:`exact_pairs`): there ``dQ`` reads ``K̃`` and ``dK`` is mapped back by ``Mᵀ``, block by block.
GQA splits the query heads as ``(Hkv, Hq/Hkv)`` so K and V are never repeated in memory (their gradients sum
over the split). A row whose every key is masked gives ``out = 0``, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

import torch

from .config import DistrConfig
from .grouping import approximate_operand, as_blocks, projections, subspace_basis, subspace_keys


def causal_bias(n_q: int, n_k: int, device, dtype, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """``(n_q, n_k)`` additive mask, queries aligned to the *last* ``n_q`` key positions (KV-cache decoding):
    keys after the query (``causal``) and keys ``window`` or more positions before it are masked."""
    rows = torch.arange(n_q, device=device).unsqueeze(1) + (n_k - n_q)
    cols = torch.arange(n_k, device=device)
    keep = cols <= rows if causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if window is not None:
        keep = keep & (cols > rows - window)
    return torch.zeros(n_q, n_k, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))


def mask_bias(attn_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean (True = keep) or additive mask -> additive float bias."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, device=attn_mask.device, dtype=dtype).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def exact_pairs(n_q: int, n_k: int, block: int, device, window: int | None = None) -> torch.Tensor:
    """``(n_q, n_k)`` bool: the pairs ``"subspace"`` scores exactly: key ``j`` in the first block (attention
    sinks), in the block of query ``i``'s position (``i + n_k − n_q``) or a neighbour of it, or in a block that a
    sliding window of ``window`` keys cuts for ``i``."""
    rows = torch.arange(n_q, device=device).unsqueeze(1) + (n_k - n_q)
    cols = torch.arange(n_k, device=device)
    exact = ((cols // block - rows // block).abs() <= 1) | (cols < block)
    if window is not None:
        exact = exact | (cols // block * block <= rows - window)
    return exact


def _operands(q, k, config, causal_grouping, hashes):
    """``(Q̃, K̃)`` in the compute dtype: the sampled operand approximated, the other as it is (``"subspace"``:
    both as they are, its reduced keys come from :func:`_subspace`)."""
    compute = _compute_dtype(q)
    if config.exact or config.grouping == "subspace":
        return q.to(compute), k.to(compute)
    if config.sampled == "q":
        return approximate_operand(q, config, causal_grouping, hashes), k.to(compute)
    return q.to(compute), approximate_operand(k, config, causal_grouping, hashes)


def _scores(q, k, attn_mask, causal, scale, window=None, softcap=None, approx_k=None, exact=None):
    """``(S, T)``: scaled, capped, masked scores ``(B, Hkv, rep, Nq, Nk)`` of the compute-dtype ``q``
    ``(B, Hq, Nq, d)`` and ``k``, and ``T = tanh(A / c)`` (``None`` without softcapping). ``approx_k``: keys
    ``"subspace"`` reduces, scoring every pair outside ``exact`` (:func:`exact_pairs`)."""
    batch, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    rep = h_q // h_kv
    q = q.view(batch, h_kv, rep, n_q, d)
    s = torch.einsum("bgrqd,bgkd->bgrqk", q, k) * scale
    if approx_k is not None:
        s = torch.where(exact, s, torch.einsum("bgrqd,bgkd->bgrqk", q, approx_k) * scale)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(s / softcap)
        s = tanh * softcap
    if attn_mask is not None:
        bias = mask_bias(attn_mask, q.dtype)
        s = s + bias.view(bias.shape[0], -1, rep if bias.shape[1] > 1 else 1, n_q, n_k)
    if causal or window is not None:
        s = s + causal_bias(n_q, n_k, q.device, q.dtype, causal, window)
    return s, tanh


def _softmax(s):
    """``(P, lse)`` of scores ``s``; rows with no finite score give ``P = 0`` and ``lse = -inf``."""
    row_max = s.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(-1, keepdim=True)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom)), lse


def _subspace(q, k, config, window):
    """``(K̃, exact, U)`` of ``"subspace"`` (else ``None``s): the projected keys and the key blocks' bases
    (:func:`hf_distrattn.grouping.subspace_keys`), the pairs scored exactly (:func:`exact_pairs`)."""
    if config.exact or config.grouping != "subspace":
        return None, None, None
    basis = subspace_basis(q, k, config)
    exact = exact_pairs(q.shape[2], k.shape[2], config.block_size, q.device, window)
    return subspace_keys(k, basis, config).to(q.dtype), exact, basis.to(q.dtype)


def attention(q, k, v, *, causal=False, attn_mask=None, scale=None, config: DistrConfig | None = None,
              dropout_p=0.0, causal_grouping=False, hashes=None, window=None, softcap=None):
    """Reference DistrAttention. Shapes as :func:`hf_distrattn.distr_attention`, arguments already validated.

    ``attn_mask`` must be 4-D ``(1|B, 1|Hq, Nq, Nk)``; ``causal_grouping`` and ``hashes`` as in
    :func:`hf_distrattn.grouping.approximate_operand`. Returns ``out`` in the compute dtype and the float32
    log-sum-exp ``(B, Hq, Nq)`` of the scaled, masked scores (``-inf`` on fully masked rows). Differentiable
    (autograd, the grouping held constant), dropout included.
    """
    config = config or DistrConfig(group_size=1)
    batch, h_q, n_q, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q, k = _operands(q, k, config, causal_grouping, hashes)
    approx_k, exact, _ = _subspace(q, k, config, window)
    p, lse = _softmax(_scores(q, k, attn_mask, causal, scale, window, softcap, approx_k, exact)[0])
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = torch.einsum("bgrqk,bgkd->bgrqd", p, v.to(q.dtype))
    return out.reshape(batch, h_q, n_q, v.shape[-1]), lse.reshape(batch, h_q, n_q).float()


def attention_backward(q, k, v, out, dout, *, causal=False, attn_mask=None, scale=None,
                       config: DistrConfig | None = None, causal_grouping=False, hashes=None, window=None,
                       softcap=None, dlse=None):
    """``(dq, dk, dv)`` of :func:`attention` (no dropout) in the compute dtype, by the module's formulas (``P``
    recomputed in the compute dtype, not from the float32 ``lse``); ``dlse`` ``(B, Hq, Nq)`` or ``None``."""
    config = config or DistrConfig(group_size=1)
    batch, h_q, n_q, d = q.shape
    h_kv = k.shape[1]
    rep = h_q // h_kv
    scale = d**-0.5 if scale is None else scale
    q_t, k_t = _operands(q, k, config, causal_grouping, hashes)
    compute = q_t.dtype
    approx_k, exact, basis = _subspace(q_t, k_t, config, window)
    s, tanh = _scores(q_t, k_t, attn_mask, causal, scale, window, softcap, approx_k, exact)
    p, _ = _softmax(s)
    do = dout.to(compute).reshape(batch, h_kv, rep, n_q, -1)
    delta = (do * out.to(compute).reshape(do.shape)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(compute).reshape(delta.shape)
    ds = p * (torch.einsum("bgrqd,bgkd->bgrqk", do, v.to(compute)) - delta)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p, do)
    q_t = q_t.view(batch, h_kv, rep, n_q, d)
    if approx_k is not None:  # dQ = scale (dA_exact K + dA_rest K̃), dK_c = scale (dA_exactᵀ Q + U_c U_cᵀ dA_restᵀ Q)
        rest = torch.where(exact, 0.0, ds)
        ds = torch.where(exact, ds, 0.0)
        dq = torch.einsum("bgrqk,bgkd->bgrqd", rest, approx_k).reshape(batch, h_q, n_q, d) * scale
        dk = subspace_keys(torch.einsum("bgrqk,bgrqd->bgkd", rest, q_t), basis, config) * scale
        dq = dq + torch.einsum("bgrqk,bgkd->bgrqd", ds, k_t).reshape(batch, h_q, n_q, d) * scale
        return dq, dk + torch.einsum("bgrqk,bgrqd->bgkd", ds, q_t) * scale, dv
    dq = torch.einsum("bgrqk,bgkd->bgrqd", ds, k_t).reshape(batch, h_q, n_q, d) * scale
    dk = torch.einsum("bgrqk,bgrqd->bgkd", ds, q_t) * scale
    if not config.exact:  # dX = dX̃ Mᵀ, block by block
        x, dx = (q, dq) if config.sampled == "q" else (k, dk)
        m = projections(x, config, causal_grouping, hashes)
        dx = (as_blocks(dx, config.block_size) @ m.transpose(-1, -2)).flatten(2, 3)[:, :, : x.shape[2]]
        dq, dk = (dx, dk) if config.sampled == "q" else (dq, dx)
    return dq, dk, dv


def reduced_keys_attention(q, k, v, reduced_keys, fuse_group, fuse_weight, *, block_size, causal=False,
                           attn_mask=None, scale=None, window=None, softcap=None):
    """Attention over keys held in reduced form (:mod:`hf_distrattn.cache`), the oracle of the decode kernel.

    Key ``s`` of block ``j ≥ 1`` is ``k̃_s = Wt_jᵀ u_s`` with ``u_s = reduced_keys[..., s, :]`` (its first ``d/G``
    columns) and ``Wt_j[g, c] = fuse_weight[j, c]·[fuse_group[j, c] = g]``; block 0 is read exactly from ``k``.
    Returns ``(out, lse)`` as :func:`attention`.
    """
    n_k = k.shape[2]
    compute = _compute_dtype(q)
    n_blocks = -(-n_k // block_size)
    dg = reduced_keys.shape[-1]
    wt = torch.nn.functional.one_hot(fuse_group[:, :, :n_blocks].long(), dg).to(compute)  # (B, H, nb, d, DG)
    wt = wt * fuse_weight[:, :, :n_blocks, :, None].to(compute)
    u = as_blocks(reduced_keys[:, :, :n_k].to(compute), block_size)  # (B, H, nb, block, DG)
    keys = (u @ wt.transpose(-1, -2)).flatten(2, 3)[:, :, :n_k]
    keys = torch.cat([k[:, :, :block_size].to(compute), keys[:, :, block_size:]], dim=2)
    return attention(q, keys, v, causal=causal, attn_mask=attn_mask, scale=scale, window=window, softcap=softcap)
