r"""The differentiable Triton path: what ``distr_attention`` runs on CUDA when gradients are needed.

The approximation only changes one operand (:mod:`hf_distrattn.grouping`): with ``Q`` sampled,

    out = softmax(scale · Q̃ Kᵀ + mask) V,      Q̃ = Q M   (per block of rows, M a fixed projection)

so the forward is ``Q̃`` followed by exact attention on ``(Q̃, K, V)``, whose forward and backward are the Triton
kernels (``G = 1`` forward of :mod:`.kernels.prefill`, :mod:`.kernels.backward`), and ``dQ = dQ̃ M``, the
grouping (permutation and rank-1 directions) held constant as in the reference. With ``K`` sampled the roles
swap. ``Q̃`` comes from the Triton grouping kernel for the kernel's settings (LSH, rank-1, power-of-two head
dim): its fuse matrix ``Wt`` (``DG × D`` per block) gives ``M = Wtᵀ Wt``, so ``Q̃ = (Q Wtᵀ) Wt`` (written by
the grouping launch itself) and ``dQ = (dQ̃ Wtᵀ) Wt`` (in the epilogue of the backward kernel that writes
``dQ̃``); other settings build ``Q̃`` with the PyTorch reference and autograd differentiates it. With causal
grouping ``M`` of block ``b`` comes from block ``b − 1`` and block 0 has ``M = I``.
"""

from __future__ import annotations

import torch

from .config import DistrConfig
from .grouping import approximate_operand
from .kernels import backward, prefill
from .kernels.grouping import group_queries
from .kernels.grouping import takes as grouping_kernel_takes
from .kernels.softmax import padded_width

EXACT = DistrConfig(group_size=1, block_size=128)


def _kernel_grouping(x: torch.Tensor, config: DistrConfig) -> bool:
    """Whether the grouping kernel builds ``X̃`` (``M = Wtᵀ Wt`` needs the rank-1 reduction's ``u = Wt x``)."""
    return config.reduce == "rank1" and grouping_kernel_takes(x, config)


class _FlashAttention(torch.autograd.Function):
    """Exact attention on ``(a, b, v)`` with the Triton kernels; returns ``(out, lse)`` (lse not differentiable).

    ``grouping = (config, causal_grouping)``: the sampled operand is first replaced by ``X̃ = (X Wtᵀ) Wt`` from the
    grouping kernel, and its gradient leaves the backward kernel as ``dX̃ M``."""

    @staticmethod
    def forward(ctx, a, b, v, causal, attn_mask, scale, grouping):
        wt, ctx.project = None, None
        if grouping is not None:
            config, causal_grouping = grouping
            operand = "a" if config.sampled == "q" else "b"
            x = a if operand == "a" else b
            x, wt = group_queries(x, config, padded_width(x.shape[-1] // config.group_size), causal_grouping,
                                  project=True)
            a, b = (x, b) if operand == "a" else (a, x)
            ctx.project = (operand, config.block_size, causal_grouping)
        exact = EXACT if a.dtype != torch.float32 else EXACT.replace(block_size=32)  # fp32 tiles: 2× the bytes
        out, lse = prefill.distr_attention_triton(a, b, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                                  config=exact)
        ctx.save_for_backward(a, b, v, out, lse, wt)
        ctx.causal, ctx.attn_mask, ctx.scale = causal, attn_mask, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        a, b, v, out, lse, wt = ctx.saved_tensors
        project = None if ctx.project is None else (ctx.project[0], wt, *ctx.project[1:])
        da, db, dv = backward.attention_backward(a, b, v, out, lse, dout, causal=ctx.causal,
                                                 attn_mask=ctx.attn_mask, scale=ctx.scale, project=project)
        return da, db, dv, None, None, None, None


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


def attention(q, k, v, *, causal: bool, attn_mask, scale: float | None, config: DistrConfig,
              causal_grouping: bool = False):
    """``(out, lse)`` of the approximation ``config`` describes, differentiable in ``q``, ``k`` and ``v``.

    Shapes as :func:`hf_distrattn.distr_attention`; ``attn_mask`` already 4-D.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grouping = None
    if not config.exact:
        x = q if config.sampled == "q" else k
        if _kernel_grouping(x, config):
            grouping = (config, causal_grouping)
        elif config.sampled == "q":
            q = approximate_operand(q, config, causal_grouping).to(q.dtype)
        else:
            k = approximate_operand(k, config, causal_grouping).to(k.dtype)
    return _FlashAttention.apply(q, k, v, causal, attn_mask, scale, grouping)
