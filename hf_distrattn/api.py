"""``distr_attention``: argument checks, then the path :func:`hf_distrattn.plan.plan` picks, through the ops."""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import ops, reference
from .config import DistrConfig
from .grouping import approximate_operand, hash_directions
from .plan import plan

DEFAULT_CONFIG = DistrConfig()
"""Settings used where none are given: ``G=2``, ``grouping="subspace"`` on the keys, blocks of 64 (the most
accurate drop-in measured; decode steps run exact)."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_CONTEXT = contextlib.nullcontext()  # reusable, one fewer object per call
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One warning per distinct message (skipped while ``torch.compile`` traces: the eager call warned)."""
    if not torch.compiler.is_compiling() and message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _check_tensors(q, k, v) -> None:
    if (type(q) is type(k) is type(v) is torch.Tensor and q.dim() == k.dim() == v.dim() == 4
            and q.dtype == k.dtype == v.dtype and q.dtype in FLOAT_DTYPES and q.device == k.device == v.device):
        _check_shapes(q, k, v)  # the common case in one test; the loop below names what is wrong
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    _check_shapes(q, k, v)


def _check_shapes(q, k, v) -> None:
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


def _check_features(window, softcap, sinks, q) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of keys or None, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or
                                not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.shape != (q.shape[1],) or not sinks.is_floating_point():
            raise ValueError(f"sinks must be a float tensor of shape ({q.shape[1]},) (one logit per query head), "
                             f"got {getattr(sinks, 'shape', type(sinks).__name__)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")


def with_sinks(out, lse, sinks):
    """Attention sinks: a per-head logit ``σ_h`` that joins each row's softmax as one more key with value 0, so
    ``out' = out · e^{lse} / (e^{lse} + e^{σ}) = out · sigmoid(lse − σ)`` and ``lse' = log(e^{lse} + e^{σ})``: exact,
    from the ``(out, lse)`` of any path, and differentiable in ``out``, ``lse`` and ``σ``."""
    sink = sinks.float()[None, :, None]
    return (out.float() * torch.sigmoid(lse - sink)[..., None]).to(out.dtype), torch.logaddexp(lse, sink)


def distr_attention(q, k, v, *, causal=False, attn_mask=None, scale=None, config=None, return_lse=False,
                    dropout_p=0.0, causal_grouping=None, reduced_keys=None, window=None, softcap=None,
                    sinks=None):
    """DistrAttention: exact softmax and ``P·V``, ``Q·Kᵀ`` at cost ``d/G`` (see :mod:`hf_distrattn.grouping`).

    Args:
        q: ``(B, Hq, Nq, d)``; k, v: ``(B, Hkv, Nk, d)`` with ``Hq % Hkv == 0`` (GQA, never repeated in memory).
        causal: mask keys after each query; the queries are the last ``Nq`` of the ``Nk`` positions (bottom-right,
            as for a chunk after a KV cache), so with ``Nq > Nk`` the first ``Nq − Nk`` rows see no key.
        attn_mask: boolean (True = keep) or additive float, broadcastable to ``(B, Hq, Nq, Nk)``;
            combines with ``causal``.
        scale: score scale, default ``d ** -0.5``.
        config: :class:`DistrConfig`; ``None`` means :data:`DEFAULT_CONFIG`.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Nq)`` of the scaled scores actually used.
        dropout_p: dropout on the attention probabilities (training; runs the differentiable reference).
        causal_grouping: group each block of the sampled operand by the previous block's rows, the first block
            exact, so that no position's scores depend on later tokens (:mod:`hf_distrattn.grouping`).
            ``None`` means ``causal``; pass ``True`` when ``attn_mask`` carries the causal pattern. A call whose
            sampled operand has at most ``block_size`` rows is then exact.
        reduced_keys: ``(reduced_keys, fuse_group, fuse_weight)`` of a reduced-key cache layer
            (:mod:`hf_distrattn.cache`; ``sampled="k"``, causal grouping): ``k``'s blocks after the first in
            reduced form, which the decode kernel reads instead of ``k`` (``d/G`` of each key instead of ``d``).
        window: sliding window: query ``i`` (at position ``i + Nk − Nq``) sees keys ``j`` with
            ``i + Nk − Nq − j < window`` only (Transformers' ``sliding_window``); the kernels skip the tiles outside
            it. ``G > 1`` holds only where no key outside a query's window enters its scores
            (:func:`hf_distrattn.plan.effective_group_size`); elsewhere the call is exact.
        softcap: logit softcapping, scores ``softcap · tanh(scale · q·k / softcap)`` (Gemma 2).
        sinks: ``(Hq,)`` attention-sink logits (gpt-oss's ``s_aux``): each joins its head's softmax as a key with
            value 0 (:func:`with_sinks`).

    Returns ``out`` ``(B, Hq, Nq, d)`` in q's dtype and layout (contiguous on the decode paths: a few rows) and, with
    ``return_lse``, ``lse`` (sinks included). Rows with every key
    masked give zeros.
    Under autocast, float32 inputs are cast to the autocast dtype first, as SDPA does (so that mixed-precision
    training of a float32 model runs the half-precision kernels). Which implementation runs is
    :func:`hf_distrattn.plan.plan`'s choice. Fallback: if ``d`` is not a multiple of ``config.group_size`` the call
    is exact, with one warning.
    """
    _check_tensors(q, k, v)
    _check_features(window, softcap, sinks, q)
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
    if mask is not None and mask.device != q.device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {q.device}")
    causal_grouping = causal if causal_grouping is None else bool(causal_grouping)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = plan(q, k, config, causal_grouping=causal_grouping, needs_grad=needs_grad, dropout_p=dropout_p,
                  mask_needs_grad=mask is not None and mask.requires_grad, reduced_keys=reduced_keys is not None,
                  window=window)
    if window is not None and chosen.group_size < config.group_size and chosen.notes[0][0].startswith("sliding"):
        warn_once(f"distr_attention: {chosen.notes[0][0].format(*chosen.notes[0][1:])}")
    if chosen.path == "reference-autograd" and q.is_cuda:
        warn_once(f"distr_attention: {chosen.reason} runs the (slower) PyTorch reference")
    if d % config.group_size:
        warn_once(f"distr_attention: head_dim {d} is not a multiple of DistrConfig.group_size={config.group_size}: "
                  "computing exact attention instead")
    elif config.group_size == d > 1:
        warn_once(f"distr_attention: DistrConfig.group_size={d} equals the head dim: every head scores with one column "
                  "(d/G = 1); the scores carry little of Q·Kᵀ")
    scale = d**-0.5 if scale is None else float(scale)
    features = (window, None if softcap is None else float(softcap))
    with torch.autocast(q.device.type, enabled=False) if autocast else _NO_CONTEXT:
        out, lse = _run(chosen, q, k, v, causal, mask, scale, config, dropout_p, causal_grouping, reduced_keys,
                        features)
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _run(chosen, q, k, v, causal, mask, scale, config, dropout_p, causal_grouping, reduced_keys, features):
    group, path = chosen.group_size, chosen.path
    if path in ("decode", "reduced-decode", "reduced-reference"):  # keys grouped already (the cache), or exact
        return ops.call(ops.decode, q, k, v, mask, *(reduced_keys or (None,) * 3), path, causal, scale,
                        config.block_size, *features)
    hashes = None
    if group > 1 and config.grouping == "lsh":
        hashes = hash_directions(config.block_size, config.num_hashes, config.seed, q.device)
    if path == "reference-autograd":
        effective = config if group == config.group_size else config.replace(group_size=group)
        return reference.attention(q, k, v, causal=causal, attn_mask=mask, scale=scale, config=effective,
                                   dropout_p=dropout_p, causal_grouping=causal_grouping, hashes=hashes,
                                   window=features[0], softcap=features[1])
    if path == "approximated":  # X̃ in PyTorch (autograd through it), then the exact kernels
        if group > 1 and config.sampled == "q":
            q = approximate_operand(q, config, causal_grouping, hashes).to(q.dtype)
        elif group > 1:
            k = approximate_operand(k, config, causal_grouping, hashes).to(k.dtype)
        path, group = "projected", 1
    out, lse, _, _ = ops.call(ops.attention, q, k, v, mask, hashes, path, causal, scale,
                              *ops.config_args(config, exact=group < config.group_size), causal_grouping, *features)
    return out, lse
