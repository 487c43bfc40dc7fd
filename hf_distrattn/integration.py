"""Transformers glue: the ``"distr"`` attention function, its mask function, and per-layer settings.

Transformers hands a custom attention function no mask unless a mask function is registered under the same
name, so ``"distr"`` registers Transformers' own SDPA mask builder (:func:`distr_mask`): a boolean
``(B, 1, Nq, Nk)`` mask (True = keep), or ``None`` where causality alone describes the call: no padding and
either as many queries as keys, one query, or a prefill into an empty static cache (whose unfilled slots are
then dropped here, as SDPA does). A causal module always gets the causal grouping, mask or not. While
``torch.compile`` traces, Transformers (≤ 5.17 with torch < 2.14) builds the mask even then: an ``(N, N)``
boolean for a plain causal prefill, an all-True one for an encoder (ViT) with no padding, which send every call
to the kernels' masked path, off the Hopper kernel. ``distr_mask`` drops that mask itself where it can tell
without reading a tensor: no padding mask, and either the causal mask function with as many queries as keys from
position 0, or the bidirectional one with no window.

Sliding windows, logit softcapping and attention sinks arrive as the keyword arguments ``sliding_window``,
``softcap`` and ``s_aux`` that models pass to every attention function (FlashAttention's contract). A
sliding-window layer without padding gets no mask, so the kernels skip the tiles outside its window instead of
reading a dense mask; with a mask (padding, a static cache) the window is in the mask. Chunked attention
(Llama 4) is refused.

With ``sampled="k"`` the keys are also kept in reduced form in the model's cache (:mod:`hf_distrattn.cache`):
:func:`configure` installs a forward pre-hook on each attention module that passes the module's cache to the
attention function as ``distr_cache`` (Transformers passes it to the module, not to attention functions).

Per-layer settings live on the attention modules and, for ``save_pretrained``, in the model config as
``distr_layers`` (one :meth:`DistrConfig.to_dict` per attention module): a model loaded with
``attn_implementation="distr"`` takes them back on its first call (or at once with ``configure(model)``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

# `cache` as a module, not its names: `import hf_distrattn.cache` first loads Transformers, whose post-import
# hook loads this module while `cache` is still half-initialised
from . import cache
from .api import DEFAULT_CONFIG, distr_attention
from .config import DistrConfig

NAME = "distr"
CACHE_KWARG = "distr_cache"


def distr_mask(*args, config=None, local_size=None, **kwargs):
    """Transformers' ``sdpa_mask`` without its ``local_size`` (a sliding window): then a sliding-window call with
    no padding needs no mask either, as the window reaches the attention function as ``sliding_window``."""
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError(f"attn_implementation='distr' does not support chunked attention "
                         f"(attention_chunk_size={config.attention_chunk_size}) of this "
                         f"{getattr(config, 'model_type', 'model')} model: use 'sdpa' for it")
    if _causal_alone(local_size, **kwargs) or _unmasked(local_size, **kwargs):
        return None
    return sdpa_mask(*args, config=config, **kwargs)


def _causal_alone(local_size, *, q_length=None, kv_length=None, q_offset=None, kv_offset=None,
                  mask_function=None, attention_mask=None, allow_is_causal_skip=True, **_) -> bool:
    """Causality (and a sliding window, which reaches the attention function as ``sliding_window``) alone
    describes the call, from Python values only (offsets as tensors, as static caches pass them, say no)."""
    return (allow_is_causal_skip and attention_mask is None and q_length == kv_length and type(q_offset) is int
            and type(kv_offset) is int and q_offset == kv_offset == 0
            and (mask_function is causal_mask_function or local_size is not None))


def _unmasked(local_size, *, mask_function=None, attention_mask=None, allow_is_bidirectional_skip=False,
              **_) -> bool:
    """Every query sees every key: the bidirectional mask function alone (no padding, no window), where the
    caller allows the skip (``create_bidirectional_mask`` does)."""
    return (allow_is_bidirectional_skip and attention_mask is None and local_size is None
            and mask_function is bidirectional_mask_function)


def distr_attention_forward(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            sliding_window: int | None = None, softcap: float | None = None, s_aux=None, **kwargs):
    """Transformers attention-interface entry: ``(B, H, N, d)`` in, ``((B, N, H, d), None)`` out."""
    config = layer_config(module)
    module_causal = bool(getattr(module, "is_causal", False))
    causal = False
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else module_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:  # a prefill into an empty static cache: top-left causal
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    window = sliding_window if attention_mask is None else None  # with a mask, the mask holds the window
    layer = None
    if module_causal and sliding_window is None:
        layer = cache.reduced_layer(kwargs.get(CACHE_KWARG), getattr(module, "layer_idx", None), config)
    out = distr_attention(query, key, value, causal=causal, attn_mask=attention_mask, scale=scaling,
                          config=config, dropout_p=dropout, causal_grouping=module_causal or causal,
                          reduced_keys=None if layer is None else layer.reduced, window=window, softcap=softcap,
                          sinks=s_aux)
    return out.transpose(1, 2).contiguous(), None


def layer_config(module: torch.nn.Module) -> DistrConfig:
    """The module's settings: set by :func:`configure`, else saved in its model config (``distr_layers``; kept on
    the module from the first eager call), else :data:`hf_distrattn.DEFAULT_CONFIG`."""
    config = getattr(module, "distr_config", None)
    if config is not None:
        return config
    saved = getattr(getattr(module, "config", None), "distr_layers", None)
    if not saved:
        return DEFAULT_CONFIG
    index = getattr(module, "layer_idx", None)
    if index is None and any(entry != saved[0] for entry in saved):
        raise ValueError("this model's saved distr settings differ per layer and its attention modules have no "
                         "layer_idx: call hf_distrattn.configure(model) after loading it")
    config = DistrConfig.from_dict(saved[0 if index is None else index])
    if not torch.compiler.is_compiling():
        module.distr_config = config
    return config


def register() -> None:
    """Register ``"distr"`` with Transformers (done on ``import hf_distrattn``)."""
    AttentionInterface.register(NAME, distr_attention_forward)
    AttentionMaskInterface.register(NAME, distr_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules that dispatch through the attention interface, in layer order."""
    found = [m for m in model.modules()
             if (hasattr(m, "scaling") or hasattr(m, "scale")) and hasattr(m, "is_causal")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module that uses the Transformers "
                         "attention interface (see hf_distrattn.patches for models that need a patch)")
    return found


def _pass_cache(module, args, kwargs):
    """Forward pre-hook of an attention module: its cache, also as the attention function's ``distr_cache``."""
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is None:
        return None
    return args, {**kwargs, CACHE_KWARG: past}


def unsupported_features(model: torch.nn.Module) -> list[str]:
    """The attention features of ``model`` that ``"distr"`` cannot serve: chunked attention (Llama 4)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    chunk = getattr(config, "attention_chunk_size", None)
    return [] if chunk is None else [f"chunked attention (attention_chunk_size={chunk})"]


def configure(model: torch.nn.Module, config: DistrConfig | None = None,
              layers: Iterable[int] | None = None) -> torch.nn.Module:
    """Use ``config`` in every attention layer of ``model``, or only in the layer indices ``layers``; without a
    config, the per-layer settings saved in ``model.config.distr_layers``.

    Layers not named keep their settings (by default :data:`hf_distrattn.DEFAULT_CONFIG`). Example: keep the
    first two layers exact with ``configure(model, DistrConfig(group_size=1), layers=[0, 1])``, or in one call
    ``configure(model, DistrConfig(group_size=2, exact_layers=(0, 1)))``. The resulting settings are written to
    ``model.config.distr_layers``, so ``save_pretrained`` keeps them.
    """
    if config is None:
        saved = getattr(model.config, "distr_layers", None)
        if not saved:
            raise ValueError("configure(model) without a config needs settings saved in model.config.distr_layers")
        for index, entry in enumerate(saved):
            configure(model, DistrConfig.from_dict(entry), layers=[index])
        return model
    if not isinstance(config, DistrConfig):
        raise TypeError(f"config must be a DistrConfig, got {type(config).__name__}")
    unsupported = unsupported_features(model)
    if unsupported:
        raise ValueError(f"attn_implementation='distr' does not support {', '.join(unsupported)} of this "
                         f"{getattr(model.config, 'model_type', type(model).__name__)} model: use 'sdpa' for it")
    modules = attention_modules(model)
    chosen = range(len(modules)) if layers is None else list(layers)
    for index in (*chosen, *config.exact_layers):
        if not isinstance(index, int) or not -len(modules) <= index < len(modules):
            raise ValueError(f"layers: {index!r} is not a layer index of a model with {len(modules)} layers")
    exact = config.replace(group_size=1)
    for index in chosen:
        modules[index].distr_config = exact if index % len(modules) in config.exact_layers else config
    for module in modules:
        if hasattr(module, "layer_idx") and _pass_cache not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_pass_cache, with_kwargs=True)
    model.config.distr_layers = [c.to_dict() for c in layer_configs(model)]
    return model


def layer_window(module: torch.nn.Module) -> int | None:
    """The sliding window a model passes to this attention module's function (its own ``sliding_window``, else its
    config's, as Mistral and Phi-3 pass it), or ``None``."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def layer_configs(model: torch.nn.Module) -> list[DistrConfig]:
    """The settings each attention layer will use."""
    return [layer_config(m) for m in attention_modules(model)]


def layer_plans(model: torch.nn.Module, seq_len: int, *, device=None, dtype=None, needs_grad: bool = False,
                decode: bool = True) -> list[dict]:
    """Which path (:func:`hf_distrattn.plan.plan`) each attention layer takes for a prefill of ``seq_len``
    tokens (batch 1) and, for causal layers with ``decode``, a one-token step after it; with the reasons, and on a
    GPU which kernel a fused or projected prefill runs (:func:`hf_distrattn.plan.sm90_refusal`, no mask). Shapes
    come from the model's config; the device and dtype default to the model's."""
    from .plan import plan, sm90_refusal

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    softcap = getattr(config, "attn_logit_softcapping", None)
    parameter = next(model.parameters())
    device, dtype = device or parameter.device, dtype or parameter.dtype
    rows = []
    for index, (module, layer_config) in enumerate(zip(attention_modules(model), layer_configs(model), strict=True)):
        causal = bool(getattr(module, "is_causal", False))
        window = layer_window(module)
        window = window if window is not None and window < seq_len else None  # a window past the input: no effect
        keys = torch.empty(1, kv_heads, seq_len, head_dim, device=device, dtype=dtype)
        cases = {"prefill": torch.empty(1, heads, seq_len, head_dim, device=device, dtype=dtype)}
        if causal and decode:
            cases["decode"] = cases["prefill"][:, :, :1]
        row = {"layer": index, "config": layer_config}
        for name, q in cases.items():
            reduced = name == "decode" and layer_config.sampled == "k" and window is None
            chosen = plan(q, keys, layer_config, causal_grouping=causal, needs_grad=needs_grad and name == "prefill",
                          reduced_keys=reduced, window=window)
            row[name] = chosen.path
            row[f"{name}_reason"] = chosen.reason
            if (name == "prefill" and q.is_cuda and chosen.path in ("fused", "projected")
                    and not (chosen.group_size > 1 and layer_config.grouping == "subspace")):
                refusal = sm90_refusal(q, keys, keys, chosen.group_size, layer_config.block_size, False, window,
                                       softcap)
                row[f"{name}_reason"] += ", sm_90 kernel" if refusal is None else (
                    ", portable kernel: " + refusal[0].format(*refusal[1:]))
        rows.append(row)
    return rows


register()
