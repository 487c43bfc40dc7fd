r"""The registered PyTorch ops, namespace ``hf_distrattn``: every kernel entry point, as FlashAttention's
``flash_attn_interface`` does (function → op → kernel).

    attention(q, k, v, attn_mask?, hashes?, path, causal, scale, <config>, causal_grouping, window?, softcap?)
        -> (out, lse, x̃, wt)
    attention_backward(dout, dlse?, q, k, v, out, lse, wt, attn_mask?, hashes?, path, ...) -> (dq, dk, dv)
    decode(q, k, v, attn_mask?, reduced_keys?, fuse_group?, fuse_weight?, path, causal, scale, block_size,
        window?, softcap?) -> (out, lse)
    reduce_keys(keys!, values!, start, hashes, reduced_keys!, fuse_group!, fuse_weight!, key_states?, value_states?,
        n_new, path, <config>) -> None

``<config>`` is a :class:`~hf_distrattn.config.DistrConfig` spelled as one string of its fields,
``"group_size,block_size,num_hashes,seed,sampled,reduce,grouping"`` (:func:`config_args`). Each op is functional
(new tensors out, inputs untouched), except ``reduce_keys``, which writes a cache layer's tensors in place (``!``:
``mutates_args``, so a decode step's update of a static cache, new keys and values included, is one launch with no
copies). Each has a fake implementation (shapes only, for ``torch.compile``), and runs the ``path`` that
:func:`hf_distrattn.plan.plan` chose: a Triton kernel, or the PyTorch reference of :mod:`hf_distrattn.reference`,
which is what every CPU tensor runs.
``attention`` is differentiable (``register_autograd``) on the ``"reference"``, ``"subspace"`` and ``"projected"``
paths, the log-sum-exp included (attention sinks differentiate through it). With ``G > 1`` on ``"projected"`` its
third and fourth outputs are the projected operand ``X̃ = X Wtᵀ Wt`` and the fuse matrices ``Wt``, which the
backward takes in place of the sampled operand (``dX = dX̃ Wtᵀ Wt``, in the kernel's epilogue); on ``"subspace"``
the fourth is the pre-pass's key bases ``U`` ``(B, Hkv, n_blocks, block, r)`` float32, which the backward takes as
``wt`` to form ``K̃_c = U Uᵀ K_c`` without a second pre-pass. Placeholders otherwise. Outputs and gradients take
the layout of the inputs they belong to (``empty_like``; contiguous when an input's head dim is strided), so
Transformers' transpose of the output back to ``(B, N, H, d)`` costs nothing; ``decode``'s are contiguous (a few
rows: its kernels address them without strides).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import reference
from .config import DistrConfig
from .grouping import block_grouping, compact_fuse, padded_width, pca_reduced, subspace_keys


@functools.lru_cache(maxsize=256)
def as_config(spec: str) -> DistrConfig:
    """The :class:`DistrConfig` that an op's ``config`` argument spells (:func:`config_args`)."""
    group_size, block_size, num_hashes, seed, sampled, reduce, grouping = spec.split(",")
    return DistrConfig(group_size=int(group_size), block_size=int(block_size), num_hashes=int(num_hashes),
                       seed=int(seed), sampled=sampled, reduce=reduce, grouping=grouping)


def config_args(config: DistrConfig, exact: bool = False) -> tuple[str]:
    """``config`` as the ops' ``<config>`` argument, ``("G,block_size,num_hashes,seed,sampled,reduce,grouping",)``
    (``G = 1`` where the plan made the call exact). One string rather than seven arguments: at every differentiable
    call, PyTorch's custom-op autograd refills the op's defaults in time quadratic in its argument count (a
    trivial op: 98 µs at 18 arguments, 57 µs at 12, on a CPU)."""
    return ("1," + config.op_spec.partition(",")[2] if exact else config.op_spec,)


@functools.cache
def _kernels():
    """The Triton kernel modules (:mod:`hf_distrattn.kernels`), imported at their first use: importing
    ``hf_distrattn`` needs no Triton, and a hot call pays no import statement."""
    from . import kernels
    from .kernels import backward, decode, grouping, prefill, subspace  # noqa: F401 - attributes of ``kernels``

    return kernels


def _like(t: Tensor, dtype=None) -> Tensor:
    """A new tensor with ``t``'s shape and layout (contiguous when ``t``'s last dim is strided)."""
    if t.stride(-1) == 1:
        return torch.empty_like(t, dtype=dtype)
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _into(like: Tensor, t: Tensor) -> Tensor:
    """``t`` in ``like``'s dtype and layout (:func:`_like`), copied only where it is not already."""
    out = _like(like)
    if t.dtype == out.dtype and t.stride() == out.stride():
        return t
    return out.copy_(t)


def _unit_stride(t: Tensor) -> Tensor:
    """The kernels address the head dim with unit stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _absent(t: Tensor) -> Tensor:
    """A placeholder output: one zero (empty tensors would count as aliases of each other)."""
    return t.new_zeros(1)


@functools.lru_cache(maxsize=64)
def _exact_kernel_config(dtype: torch.dtype, d: int) -> DistrConfig:
    """Tiles of every exact forward (``G = 1``, and the ``"projected"`` path's): 128 query rows, 64 for head dims
    above 128, 32 in float32 (twice the bytes); exact attention has no blocks, so ``block_size`` plays no part."""
    return DistrConfig(group_size=1, block_size=32 if dtype == torch.float32 else 64 if d > 128 else 128)


def _wt_shape(x: Tensor, group_size: int, block_size: int) -> tuple:
    """The shape of ``Wt`` on the ``"projected"`` path for the sampled operand ``x``."""
    batch, heads, n, d = x.shape
    return batch, heads, -(-n // block_size), padded_width(d // group_size), d


# --- attention ------------------------------------------------------------------------------------------------


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, hashes: Tensor | None, path: str,
              causal: bool, scale: float, config: str, causal_grouping: bool, window: int | None,
              softcap: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, lse, x̃, wt)`` of :func:`hf_distrattn.distr_attention` on ``path`` (module notes); ``attn_mask`` 4-D."""
    config = as_config(config)
    group_size, sampled, grouping = config.group_size, config.sampled, config.grouping
    operand, wt = _absent(q), _absent(q)
    features = dict(window=window, softcap=softcap)
    if path == "reference":
        out, lse = reference.attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, config=config,
                                       causal_grouping=causal_grouping, hashes=hashes, **features)
        return _into(q, out), lse, operand, wt
    prefill = _kernels().prefill
    like = q
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    if path in ("fused", "subspace"):
        prepared = subspace = None  # LSH: the grouping kernel, inside the call
        width = padded_width(q.shape[-1] // group_size)
        if group_size > 1 and grouping == "pca":
            u, wt = pca_reduced(q, config, causal_grouping, width)
            prepared = (u, k, v, wt)
        elif group_size > 1 and grouping == "subspace":
            *subspace, basis = _kernels().subspace.subspace_reduced(q, k, config, width)
            if path == "subspace":  # the backward's
                wt = basis
        if group_size == 1:
            config = _exact_kernel_config(q.dtype, q.shape[-1])
        out, lse = prefill.distr_attention_triton(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                                  config=config, causal_grouping=causal_grouping, hashes=hashes,
                                                  prepared=prepared, subspace=subspace, **features)
    elif path == "projected":
        if group_size > 1:
            x = q if sampled == "q" else k
            operand, wt = _kernels().grouping.reduce_operand(x, hashes, config, padded_width(x.shape[-1] // group_size),
                                        causal_grouping, project=True)
            q, k = (operand, k) if sampled == "q" else (q, operand)
        out, lse = prefill.distr_attention_triton(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                                  config=_exact_kernel_config(q.dtype, q.shape[-1]), **features)
    else:
        raise ValueError(f"hf_distrattn::attention: unknown path {path!r}")
    return (out if out.shape == like.shape else _into(like, out)), lse, operand, wt  # a padded head dim: copy


attention = torch.library.custom_op("hf_distrattn::attention", _attention, mutates_args=())


@attention.register_fake
def _(q, k, v, attn_mask, hashes, path, causal, scale, config, causal_grouping, window, softcap):
    config = as_config(config)
    group_size, block_size, sampled = config.group_size, config.block_size, config.sampled
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    if path == "projected" and group_size > 1:
        x = q if sampled == "q" else k
        return _like(q), lse, _like(x), x.new_empty(_wt_shape(x, group_size, block_size))
    if path == "subspace" and group_size > 1:
        batch, h_kv, n, d = k.shape
        basis = k.new_empty(batch, h_kv, -(-n // block_size), block_size, min(d // group_size, block_size),
                            dtype=torch.float32)
        return _like(q), lse, _absent(q), basis
    return _like(q), lse, _absent(q), _absent(q)


def _attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                       lse: Tensor, wt: Tensor, attn_mask: Tensor | None, hashes: Tensor | None, path: str,
                       causal: bool, scale: float, config: str, causal_grouping: bool, window: int | None,
                       softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`attention` given the gradients of its ``out`` and ``lse`` (``None``: zero). On
    ``"projected"`` with ``G > 1`` the sampled one of ``q``/``k`` is the forward's ``x̃`` and ``wt`` its fuse
    matrices; on ``"subspace"`` ``wt`` is the forward's key bases ``U``."""
    config = as_config(config)
    group_size, block_size = config.group_size, config.block_size
    features = dict(window=window, softcap=softcap, dlse=dlse)
    if path == "reference":
        grads = reference.attention_backward(q, k, v, out, dout, causal=causal, attn_mask=attn_mask,
                                             scale=scale, config=config, causal_grouping=causal_grouping,
                                             hashes=hashes, **features)
    elif path == "subspace":
        kernel_backward = _kernels().backward.attention_backward
        q, k = _unit_stride(q), _unit_stride(k)
        k_red = torch.empty_like(k).copy_(subspace_keys(k, wt, config))  # K's layout
        dk_red = torch.empty_like(k)
        dq, dk, dv = kernel_backward(q, k, _unit_stride(v), out, lse, dout, causal=causal, attn_mask=attn_mask,
                                     scale=scale, subspace=(k_red, dk_red, block_size), **features)
        grads = dq, dk + subspace_keys(dk_red, wt, config).to(dk.dtype), dv
    elif path == "projected":
        kernel_backward = _kernels().backward.attention_backward
        project = None
        if group_size > 1:
            project = (config.sampled, wt, block_size, causal_grouping)
        grads = kernel_backward(*(_unit_stride(t) for t in (q, k, v)), out, lse, dout, causal=causal,
                                attn_mask=attn_mask, scale=scale, project=project, **features)
    else:
        raise ValueError(f"hf_distrattn::attention_backward: path {path!r} is not differentiable")
    return tuple(_into(t, g) for t, g in zip((q, k, v), grads, strict=True))


attention_backward = torch.library.custom_op("hf_distrattn::attention_backward", _attention_backward, mutates_args=())


@attention_backward.register_fake
def _(dout, dlse, q, k, v, *args):
    return _like(q), _like(k), _like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, hashes, path, *rest = inputs
    config = as_config(rest[2])
    out, lse, operand, wt = output
    if path == "projected" and config.group_size > 1:  # the backward kernels work on X̃
        q, k = (operand, k) if config.sampled == "q" else (q, operand)
    ctx.save_for_backward(q, k, v, out, lse, wt, attn_mask, hashes)
    ctx.arguments = (path, *rest)


def _backward(ctx, dout, dlse, _doperand, _dwt):
    q, k, v, out, lse, wt, attn_mask, hashes = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, dlse, q, k, v, out, lse, wt, attn_mask, hashes, *ctx.arguments)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.arguments))


attention.register_autograd(_backward, setup_context=_setup_context)


# --- decoding: a few queries against a long cache --------------------------------------------------------------


def _decode(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, reduced_keys: Tensor | None,
            fuse_group: Tensor | None, fuse_weight: Tensor | None, path: str, causal: bool, scale: float,
            block_size: int, window: int | None, softcap: float | None) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a few queries: ``path`` ``"decode"`` (the split-KV kernel over ``k``, exact; the reduced
    tensors ``None``), or over keys whose blocks after the first a cache layer holds reduced: ``"reduced-decode"``
    (the kernel, which reads ``d/G`` of each such key) or ``"reduced-reference"``
    (:func:`hf_distrattn.reference.reduced_keys_attention`). Two outputs, so that a decode step launches nothing
    but its two kernels (no placeholders to fill)."""
    if path == "reduced-reference":
        out, lse = reference.reduced_keys_attention(q, k, v, reduced_keys, fuse_group, fuse_weight,
                                                    block_size=block_size, causal=causal, attn_mask=attn_mask,
                                                    scale=scale, window=window, softcap=softcap)
        return out.to(q.dtype, memory_format=torch.contiguous_format), lse
    if path not in ("decode", "reduced-decode"):
        raise ValueError(f"hf_distrattn::decode: unknown path {path!r}")
    reduced = None if path == "decode" else (reduced_keys, fuse_group, fuse_weight, block_size)
    return _kernels().decode.decode_attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale,
                                              reduced=reduced, window=window, softcap=softcap)


decode = torch.library.custom_op("hf_distrattn::decode", _decode, mutates_args=())


@decode.register_fake
def _(q, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _reduce_keys(keys: Tensor, values: Tensor, start: Tensor, hashes: Tensor, reduced_keys: Tensor,
                 fuse_group: Tensor, fuse_weight: Tensor, key_states: Tensor | None, value_states: Tensor | None,
                 n_new: int, path: str, config: str) -> None:
    """Write the reduced form of the keys ``start .. start + n_new − 1`` (``start`` a 0-d int64 tensor) of the
    cache ``keys`` ``(B, H, N, d)`` into the cache layer's tensors, in place, block ``j`` grouped by block
    ``j − 1``: rows ``start ..`` of ``reduced_keys`` ``(B, H, capacity, width)`` (``u``, columns past ``d/G``
    zero), and for each block the new keys span its columns' groups int32 and fuse weights float32 in
    ``fuse_group``/``fuse_weight`` ``(B, H, capacity_blocks, d)``. With ``key_states``/``value_states``
    ``(B, H, n_new, d)``, first write them into rows ``start ..`` of ``keys``/``values`` (a static cache's update, in
    the same launch: the kernel writes no row past ``N``, this reference raises), else ``keys`` holds them already.
    The kernel reads a block that began before ``start`` from the compact form instead of grouping it again; this
    reference groups every block (same values)."""
    config = as_config(config)
    group_size, block_size = config.group_size, config.block_size
    if path == "kernel":
        states = (None, None) if key_states is None else (_unit_stride(key_states), _unit_stride(value_states))
        _kernels().grouping.reduce_keys(keys, values, start, hashes, *states, n_new, config, reduced_keys,
                                        fuse_group, fuse_weight)  # a cache's tensors: unit-stride head dim
        return
    if key_states is not None:
        written = start + torch.arange(n_new, device=keys.device)
        keys.index_copy_(2, written, key_states.to(keys.dtype))
        values.index_copy_(2, written, value_states.to(values.dtype))
    d = keys.shape[-1]
    n_blocks = (n_new - 1) // block_size + 2  # the last block repeated where fewer are spanned
    first = start // block_size
    index = torch.minimum(first + torch.arange(n_blocks, device=keys.device), (start + n_new - 1) // block_size)
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
    source_rows = (index[:, None] - 1) * block_size + torch.arange(block_size, device=keys.device)  # block j - 1
    source = keys.index_select(2, source_rows.clamp_min(0).flatten()).to(compute)
    source = (source * (source_rows >= 0).flatten()[:, None]).unflatten(2, (n_blocks, block_size))  # block 0: zeros
    perm, w, v = block_grouping(source, config, hashes)
    group, weight = compact_fuse(perm, v, group_size)
    rows = start + torch.arange(n_new, device=keys.device)
    block_of_row = rows // block_size - first
    perm_rows, w_rows = perm.index_select(2, block_of_row), w.index_select(2, block_of_row)
    x = keys.index_select(2, rows).to(compute)
    u = (x.gather(-1, perm_rows).unflatten(-1, (-1, group_size)) * w_rows).sum(-1)
    width = reduced_keys.shape[-1]
    reduced_keys.index_copy_(2, rows, torch.nn.functional.pad(u, (0, width - d // group_size)).to(keys.dtype))
    fuse_group.index_copy_(2, index, group)
    fuse_weight.index_copy_(2, index, weight.to(keys.dtype).float())


reduce_keys = torch.library.custom_op("hf_distrattn::reduce_keys", _reduce_keys,
                                      mutates_args=("keys", "values", "reduced_keys", "fuse_group", "fuse_weight"))


@reduce_keys.register_fake
def _(*args) -> None:
    return None


_IMPLEMENTATIONS = {attention: _attention, attention_backward: _attention_backward,
                    decode: _decode, reduce_keys: _reduce_keys}


def call(op, *args):
    """``op(*args)``, or in eager code that needs no gradient its implementation called directly: the same
    function, without the ~25 µs of Python that the dispatcher's custom-op path adds to every call (measured on a
    CPU; a kernel launch costs a few µs). Traced code (``torch.compile``) and autograd always go through the op.
    The differentiable inputs of every op are its first three, tensors (``q, k, v``; ``reduce_keys``'s ``keys,
    values, start``; a mask that needs a gradient never reaches an op: :func:`hf_distrattn.plan.plan`)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            args[0].requires_grad or args[1].requires_grad or args[2].requires_grad)):
        return op(*args)
    return _IMPLEMENTATIONS[op](*args)
