"""Transformers glue: the ``"distr"`` attention function, its mask function, and per-layer settings.

Transformers hands a custom attention function no mask unless a mask function is registered under the same
name, so ``"distr"`` registers Transformers' own SDPA mask builder: a boolean ``(B, 1, Nq, Nk)`` mask
(True = keep), or ``None`` when the causal pattern alone describes the batch (then the module's
``is_causal`` applies). A causal module always gets the causal grouping, mask or not; with ``sampled="k"`` it
also keeps its keys in reduced form across decoding calls (:mod:`hf_distrattn.kvcache`), forgotten whenever a
call has no past (a new sequence).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .api import DEFAULT_CONFIG, distr_attention
from .config import DistrConfig
from .kvcache import ReducedKeys

NAME = "distr"
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux")


def distr_attention_forward(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Transformers attention-interface entry: ``(B, H, N, d)`` in, ``((B, N, H, d), None)`` out."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='distr' does not support {name}={kwargs[name]!r}")
    config = getattr(module, "distr_config", None) or DEFAULT_CONFIG
    module_causal = bool(getattr(module, "is_causal", False))
    causal = False
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else module_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:
            # Transformers skips the mask only where SDPA's top-left causal alignment is right: a prefill into an
            # empty static cache, whose slots past the prompt are unfilled. Those keys must not be attended.
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    reduced_keys = None
    if module_causal and config.sampled == "k" and not config.exact:
        reduced_keys = getattr(module, "distr_reduced_keys", None)
        if reduced_keys is None or reduced_keys.config != config:
            reduced_keys = module.distr_reduced_keys = ReducedKeys(config)
        if query.shape[2] == key.shape[2]:
            reduced_keys.reset()
    out = distr_attention(query, key, value, causal=causal, attn_mask=attention_mask, scale=scaling,
                          config=config, dropout_p=dropout, causal_grouping=module_causal or causal,
                          reduced_keys=reduced_keys)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"distr"`` with Transformers (done on ``import hf_distrattn``)."""
    AttentionInterface.register(NAME, distr_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules that dispatch through the attention interface, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module that uses the Transformers "
                         "attention interface (see hf_distrattn.patches for models that need a patch)")
    return found


def configure(model: torch.nn.Module, config: DistrConfig, layers: Iterable[int] | None = None) -> torch.nn.Module:
    """Use ``config`` in every attention layer of ``model``, or only in the layer indices ``layers``.

    Layers not named keep their settings (by default :data:`hf_distrattn.DEFAULT_CONFIG`). Example: keep the
    first two layers exact with ``configure(model, DistrConfig(group_size=1), layers=[0, 1])``, or in one call
    ``configure(model, DistrConfig(group_size=2, exact_layers=(0, 1)))``.
    """
    if not isinstance(config, DistrConfig):
        raise TypeError(f"config must be a DistrConfig, got {type(config).__name__}")
    modules = attention_modules(model)
    chosen = range(len(modules)) if layers is None else list(layers)
    for index in (*chosen, *config.exact_layers):
        if not isinstance(index, int) or not -len(modules) <= index < len(modules):
            raise ValueError(f"layers: {index!r} is not a layer index of a model with {len(modules)} layers")
    exact = config.replace(group_size=1)
    for index in chosen:
        modules[index].distr_config = exact if index % len(modules) in config.exact_layers else config
    return model


def layer_configs(model: torch.nn.Module) -> list[DistrConfig]:
    """The settings each attention layer will use."""
    return [getattr(m, "distr_config", None) or DEFAULT_CONFIG for m in attention_modules(model)]
