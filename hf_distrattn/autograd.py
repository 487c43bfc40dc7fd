r"""The differentiable Triton path: what ``distr_attention`` runs on CUDA when gradients are needed.

The approximation only changes one operand (:mod:`hf_distrattn.grouping`): with ``Q`` sampled,

    out = softmax(scale · Q̃ Kᵀ + mask) V,      Q̃ = approximate_operand(Q)

so the forward is ``Q̃`` (PyTorch, recorded by autograd) followed by exact attention on ``(Q̃, K, V)``, whose
forward and backward are the Triton kernels (``G = 1`` forward of :mod:`.kernels.prefill`,
:mod:`.kernels.backward`). The chain rule ``dQ = (∂Q̃/∂Q)ᵀ dQ̃`` then runs through autograd of the grouping:
the gradients are exactly those of the approximation computed (the LSH permutation is a constant, the rank-1
factors are differentiated through their power iteration). With ``K`` sampled the roles swap.
"""

from __future__ import annotations

import torch

from .config import DistrConfig
from .grouping import approximate_operand
from .kernels import backward, prefill

EXACT = DistrConfig(group_size=1, block_size=128)


class _FlashAttention(torch.autograd.Function):
    """Exact attention on ``(a, b, v)`` with the Triton kernels; returns ``(out, lse)`` (lse not differentiable)."""

    @staticmethod
    def forward(ctx, a, b, v, causal, attn_mask, scale):
        out, lse = prefill.distr_attention_triton(a, b, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                                  config=EXACT)
        ctx.save_for_backward(a, b, v, out, lse)
        ctx.causal, ctx.attn_mask, ctx.scale = causal, attn_mask, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        a, b, v, out, lse = ctx.saved_tensors
        da, db, dv = backward.attention_backward(a, b, v, out, lse, dout, causal=ctx.causal,
                                                 attn_mask=ctx.attn_mask, scale=ctx.scale)
        return da.to(a.dtype), db, dv, None, None, None


def supports(q: torch.Tensor, attn_mask, dropout_p: float) -> str | None:
    """``None`` if the differentiable Triton path takes this call, else why not."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if not 16 <= q.shape[-1] <= 256:
        return f"head_dim {q.shape[-1]}"
    if dropout_p:
        return "dropout"
    if attn_mask is not None and attn_mask.requires_grad:
        return "attn_mask requires grad"
    return None


def attention(q, k, v, *, causal: bool, attn_mask, scale: float | None, config: DistrConfig):
    """``(out, lse)`` of the approximation ``config`` describes, differentiable in ``q``, ``k`` and ``v``.

    Shapes as :func:`hf_distrattn.distr_attention`; ``attn_mask`` already 4-D.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not config.exact:
        if config.sampled == "q":
            q = approximate_operand(q, config).to(q.dtype)
        else:
            k = approximate_operand(k, config).to(k.dtype)
    return _FlashAttention.apply(q, k, v, causal, attn_mask, scale)
