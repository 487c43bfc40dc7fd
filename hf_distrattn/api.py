"""``distr_attention``: argument checks, then dispatch to the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import reference
from .config import DistrConfig

DEFAULT_CONFIG = DistrConfig()
"""Settings used where none are given: ``G=2``, blocks of 64 queries, rank-1 reduction, 8 hash bits."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _triton_refusal(q: torch.Tensor, config: DistrConfig, dropout_p: float, needs_grad: bool,
                    attn_mask) -> str | None:
    """Why the Triton kernels cannot take this call (``None`` if they can)."""
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {q.device} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    try:
        from . import autograd
        from .kernels import prefill
    except ImportError as error:
        return f"triton is not importable ({error})"
    if needs_grad or config.sampled == "k":
        return autograd.supports(q, attn_mask, dropout_p)
    return prefill.supports(q, config, dropout_p)


def selected_backend(q: torch.Tensor, config: DistrConfig, dropout_p: float = 0.0, needs_grad: bool = False,
                     attn_mask=None) -> str:
    """``"triton"`` or ``"reference"``: what :func:`distr_attention` runs for these inputs.

    ``backend="auto"`` takes the kernels for CUDA tensors they support; ``"triton"`` insists (CPU tensors run
    them under ``TRITON_INTERPRET=1``) and raises a ValueError naming the reason when they cannot. Calls that
    need gradients take the differentiable Triton path of :mod:`hf_distrattn.autograd`; where it cannot
    (dropout, a mask that needs gradients) they run the differentiable reference, with one warning on CUDA.
    """
    if config.backend == "reference" or (config.backend == "auto" and q.device.type != "cuda"):
        return "reference"
    refusal = _triton_refusal(q, config, dropout_p, needs_grad, attn_mask)
    if refusal is None:
        return "triton"
    if config.backend == "triton":
        raise ValueError(f"DistrConfig.backend='triton' cannot take this call: {refusal}")
    if needs_grad:
        warn_once(f"distr_attention: the Triton training path cannot take this call ({refusal}); "
                  "running the (slower) PyTorch reference")
    return "reference"


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[-1]}, k has {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one position")


def normalize_mask(attn_mask, batch: int, heads: int, n_q: int, n_k: int) -> torch.Tensor | None:
    """Check ``attn_mask`` broadcasts to ``(batch, heads, n_q, n_k)``; return it 4-D as ``(1|B, 1|H, n_q, n_k)``."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be boolean (True = keep) or an additive float mask, got {attn_mask.dtype}")
    if not 2 <= attn_mask.dim() <= 4:
        raise ValueError(f"attn_mask must have 2 to 4 dims, got shape {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    target = (batch, heads, n_q, n_k)
    if any(m not in (1, t) for m, t in zip(mask.shape, target, strict=True)):
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
    return mask.expand(mask.shape[0], mask.shape[1], n_q, n_k)


def distr_attention(q, k, v, *, causal=False, attn_mask=None, scale=None, config=None, return_lse=False,
                    dropout_p=0.0, causal_grouping=None, reduced_keys=None):
    """DistrAttention: exact softmax and ``P·V``, ``Q·Kᵀ`` at cost ``d/G`` (see :mod:`hf_distrattn.grouping`).

    Args:
        q: ``(B, Hq, Nq, d)``; k, v: ``(B, Hkv, Nk, d)`` with ``Hq % Hkv == 0`` (GQA, never repeated in memory).
        causal: mask keys after each query; with ``Nq < Nk`` the queries are the last ``Nq`` positions.
        attn_mask: boolean (True = keep) or additive float, broadcastable to ``(B, Hq, Nq, Nk)``;
            combines with ``causal``.
        scale: score scale, default ``d ** -0.5``.
        config: :class:`DistrConfig`; ``None`` means :data:`DEFAULT_CONFIG`.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Nq)`` of the scaled scores actually used.
        dropout_p: dropout on the attention probabilities (training only).
        causal_grouping: group each block of the sampled operand by the previous block's rows, the first block
            exact, so that no position's scores depend on later tokens (:mod:`hf_distrattn.grouping`).
            ``None`` means ``causal``; pass ``True`` when ``attn_mask`` carries the causal pattern. A causal
            call with at most ``block_size`` queries (decoding) is then exact when ``q`` is sampled.
        reduced_keys: a :class:`hf_distrattn.kvcache.ReducedKeys` that holds this layer's keys in reduced form
            across decoding calls (``sampled="k"``, causal grouping, CUDA): each call extends it to ``k`` and
            the decode kernel reads ``d/G`` of each key. Without it such calls build the reduced form anew.

    Returns ``out`` ``(B, Hq, Nq, d)`` in q's dtype (and ``lse``). Rows with every key masked give zeros.
    Under autocast, float32 inputs are cast to the autocast dtype first, as SDPA does (so that mixed-precision
    training of a float32 model runs the half-precision kernels).
    Fallback: if ``d`` is not a multiple of ``config.group_size`` the call is exact, with one warning.
    """
    _check_tensors(q, k, v)
    autocast = torch.is_autocast_enabled(q.device.type)
    if q.dtype == torch.float32 and autocast:
        q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
    config = DEFAULT_CONFIG if config is None else config
    if not isinstance(config, DistrConfig):
        raise TypeError(f"config must be a DistrConfig or None, got {type(config).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    batch, heads, n_q, d = q.shape
    mask = normalize_mask(attn_mask, batch, heads, n_q, k.shape[2])
    if d % config.group_size:
        warn_once(f"head_dim {d} is not a multiple of DistrConfig.group_size={config.group_size}: "
                  "computing exact attention instead")
        config = config.replace(group_size=1)
    causal_grouping = causal if causal_grouping is None else bool(causal_grouping)
    if causal_grouping and config.sampled == "q" and n_q <= config.block_size:
        config = config.replace(group_size=1)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = selected_backend(q, config, dropout_p, needs_grad, mask)
    if backend == "triton":  # the kernels address the head dim with unit stride
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
        out, lse = _run(backend, needs_grad, q, k, v, causal, mask, scale, config, dropout_p, causal_grouping,
                        reduced_keys)  # each path picks its own precision
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _run(backend, needs_grad, q, k, v, causal, mask, scale, config, dropout_p, causal_grouping, reduced_keys):
    if backend == "triton" and not needs_grad:
        from . import kvcache
        from .kernels import decode

        if decode.supports(q, k, config) is None:
            if config.exact:
                return decode.decode_attention(q, k, v, causal=causal, attn_mask=mask, scale=scale)
            if kvcache.reducible(k, config, causal_grouping):
                if reduced_keys is not None and reduced_keys.config != config:
                    raise ValueError(f"reduced_keys holds keys reduced for {reduced_keys.config}, not {config}")
                keys = (reduced_keys or kvcache.ReducedKeys(config)).update(k)
                return decode.decode_attention(q, k, v, causal=causal, attn_mask=mask, scale=scale, reduced=keys)
    if backend == "triton" and (needs_grad or config.sampled == "k"):
        from . import autograd

        return autograd.attention(q, k, v, causal=causal, attn_mask=mask, scale=scale, config=config,
                                  causal_grouping=causal_grouping)
    if backend == "triton":
        from .kernels import prefill

        return prefill.distr_attention_triton(q, k, v, causal=causal, attn_mask=mask, scale=scale, config=config,
                                              causal_grouping=causal_grouping)
    return reference.attention(q, k, v, causal=causal, attn_mask=mask, scale=scale, config=config,
                               dropout_p=dropout_p, causal_grouping=causal_grouping)
