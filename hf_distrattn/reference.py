"""Plain-PyTorch attention: the oracle of every kernel test and the path used off CUDA.

``out = softmax(scale · Q̃ Kᵀ + bias) V`` with ``Q̃``/``K̃`` from :mod:`hf_distrattn.grouping` (exact when
``group_size == 1``), computed in float32 (float64 for float64 input). GQA splits the query heads as
``(Hkv, Hq/Hkv)`` so K and V are never repeated in memory. A row whose every key is masked gives ``out = 0``
and ``lse = -inf`` instead of NaN.
"""

from __future__ import annotations

import torch

from .config import EXACT
from .grouping import approximate_operand


def causal_bias(n_q: int, n_k: int, device, dtype) -> torch.Tensor:
    """``(n_q, n_k)`` additive mask, queries aligned to the *last* ``n_q`` key positions (KV-cache decoding)."""
    rows = torch.arange(n_q, device=device).unsqueeze(1) + (n_k - n_q)
    keep = torch.arange(n_k, device=device) <= rows
    return torch.zeros(n_q, n_k, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))


def mask_bias(attn_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean (True = keep) or additive mask -> additive float bias."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, device=attn_mask.device, dtype=dtype).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def attention(q, k, v, *, causal=False, attn_mask=None, scale=None, config=None, dropout_p=0.0,
              causal_grouping=False):
    """Reference DistrAttention. Shapes as :func:`hf_distrattn.distr_attention`, arguments already validated.

    ``attn_mask`` must be 4-D ``(1|B, 1|Hq, Nq, Nk)``; ``causal_grouping`` as in
    :func:`hf_distrattn.grouping.approximate_operand`. Returns ``out`` in the compute dtype and the float32
    log-sum-exp ``(B, Hq, Nq)`` of the scaled, masked scores (``-inf`` on fully masked rows).
    """
    config = config or EXACT
    batch, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    if config.sampled == "q":
        q, k = approximate_operand(q, config, causal_grouping), k.to(compute)
    else:
        q, k = q.to(compute), approximate_operand(k, config, causal_grouping)
    rep = h_q // h_kv
    qg = q.view(batch, h_kv, rep, n_q, d)
    scores = torch.einsum("bgrqd,bgkd->bgrqk", qg, k) * scale
    if attn_mask is not None:
        bias = mask_bias(attn_mask, compute)
        scores = scores + bias.view(bias.shape[0], -1, rep if bias.shape[1] > 1 else 1, n_q, n_k)
    if causal:
        scores = scores + causal_bias(n_q, n_k, q.device, compute)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = torch.einsum("bgrqk,bgkd->bgrqd", p, v.to(compute))
    return out.reshape(batch, h_q, n_q, v.shape[-1]), lse.reshape(batch, h_q, n_q).float()
