"""Route timm's ``Attention`` (ViT, DeiT, ...) through :func:`hf_distrattn.distr_attention`.

timm calls ``F.scaled_dot_product_attention`` inside ``Attention.forward`` instead of a pluggable interface, so
:func:`apply` swaps the forward of each ``Attention`` module in a model for :func:`distr_forward` (same
maths as timm's, attention replaced) and :func:`revert` puts the original back. timm stays optional: nothing
here imports it; modules are recognised by timm's attribute layout (``qkv``, ``num_heads``, ``head_dim``,
``proj``).
"""

from __future__ import annotations

import types

import torch

from ..api import DEFAULT_CONFIG, distr_attention
from ..config import DistrConfig

_ORIGINAL = "_hf_distrattn_original_forward"


def is_timm_attention(module: torch.nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("qkv", "num_heads", "head_dim", "proj", "q_norm", "k_norm"))


def distr_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm ``Attention.forward`` with ``distr_attention`` in place of SDPA (optional gate and scale-norm kept)."""
    batch, n, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = distr_attention(q, k, v, causal=is_causal, attn_mask=attn_mask, scale=self.scale,
                        config=getattr(self, "distr_config", None) or DEFAULT_CONFIG,
                        dropout_p=self.attn_drop.p if self.training else 0.0)
    x = x.transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim)
    x = self.norm(x) if hasattr(self, "norm") else x
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def apply(model: torch.nn.Module, config: DistrConfig | None = None) -> int:
    """Patch every timm attention module of ``model``; returns how many were patched."""
    count = 0
    for module in model.modules():
        if is_timm_attention(module):
            if not hasattr(module, _ORIGINAL):
                setattr(module, _ORIGINAL, module.__dict__.get("forward"))
                module.forward = types.MethodType(distr_forward, module)
            if config is not None:
                module.distr_config = config
            count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no timm Attention module to patch")
    return count


def revert(model: torch.nn.Module) -> int:
    """Undo :func:`apply`; returns how many modules were restored."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = module.__dict__.pop(_ORIGINAL)
            if original is None:
                del module.forward  # back to the class's own forward
            else:
                module.forward = original
            module.__dict__.pop("distr_config", None)
            count += 1
    return count
