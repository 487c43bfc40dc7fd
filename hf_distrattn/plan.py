"""Which implementation runs a call: the one place that decides, used by the function, the tests and the CLI.

:func:`plan` looks only at shapes, dtypes, devices and settings (never at tensor values), so under
``torch.compile`` it is decided once per compiled graph. The paths (:data:`PATHS`):

- ``"reference"``: the PyTorch reference (:mod:`hf_distrattn.reference`) inside the ``hf_distrattn`` ops: any
  device, any setting; the path of every CPU tensor (unless ``backend="triton"`` under ``TRITON_INTERPRET=1``,
  which is how CI runs the kernels).
- ``"reference-autograd"``: the reference called directly, differentiated by autograd: the one path with
  attention dropout or a mask that needs a gradient.
- ``"fused"``: the fused ``d/G`` prefill kernel (:mod:`.kernels.prefill`), ``sampled="q"``, no gradients; LSH
  groups from the grouping kernel, or ``"pca"`` bases from PyTorch (:func:`hf_distrattn.grouping.pca_reduced`);
  ``"subspace"``'s reduced keys and query factors from the Triton pre-pass (:mod:`hf_distrattn.kernels.subspace`).
- ``"subspace"``: ``grouping="subspace"`` with gradients: its fused forward, then the backward kernels reading
  ``K`` or ``K̃_c = U_c U_cᵀ K_c`` per tile (:func:`hf_distrattn.kernels.backward.attention_backward`).
- ``"projected"``: the sampled operand replaced by ``X̃ = X M`` by the grouping kernel (LSH, rank-1 groups), then
  the exact kernels forward and backward: training, and ``sampled="k"`` prefill.
- ``"approximated"``: the same with ``X̃`` from the PyTorch grouping (differentiable by autograd), for settings the
  grouping kernel does not take (ablations, ``reduce="sample"`` in training, block sizes, head dims).
- ``"decode"``: the split-KV kernel for a few queries (:mod:`.kernels.decode`), exact calls.
- ``"reduced-decode"``: the split-KV kernel over keys that a cache layer keeps in reduced form
  (:mod:`hf_distrattn.cache`), ``sampled="k"``; ``"reduced-reference"``: its PyTorch reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

from .config import DistrConfig

PATHS = ("reference", "reference-autograd", "fused", "subspace", "projected", "approximated", "decode",
         "reduced-decode", "reduced-reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (16, 32, 64, 128)
"""Grouping block sizes the kernels take (one program's rows)."""
MAX_DECODE_QUERIES = 16
MAX_DECODE_ROWS = 128
"""The decode kernel packs a KV head's ``Hq/Hkv · Nq`` query rows in one tile of at most this many rows."""
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SM90 = os.environ.get("HF_DISTRATTN_SM90", "1") != "0"
"""Whether the ``"fused"`` and ``"projected"`` paths run the Hopper kernel (:mod:`.kernels.hopper`) on the calls it
takes (:func:`sm90_refusal`); ``HF_DISTRATTN_SM90=0`` keeps the portable kernel everywhere."""
HAS_TRITON = importlib.util.find_spec("triton") is not None
SM90_MIN_KEYS_D64 = 1024
"""At head dim 64 the Hopper kernel takes calls of at least this many keys: below, its programs' fixed cost (TMA
and barrier set-up for a loop of few key tiles) outweighs its speed (H100, kernel alone, exact, TFLOP/s Hopper
vs portable: 197 keys 114 / 143, 577 keys 249 / 271, 1024 keys 358 / 370 but causal 249 / 211; docs/design.md P4)."""


Note = tuple
"""A reason, ``(template, *values)``: formatted only when read (:attr:`Plan.reason`), so that ``torch.compile``
never builds a string from a symbolic size."""


class Plan(NamedTuple):
    path: str
    """One of :data:`PATHS`."""
    group_size: int
    """The ``G`` the call computes with: ``1`` where the call is exact (see :func:`effective_group_size`)."""
    notes: tuple[Note, ...]

    @property
    def reason(self) -> str:
        """Why this path (and why not a faster one), for people."""
        return ", ".join(template.format(*values) for template, *values in self.notes)


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def effective_group_size(q: torch.Tensor, k: torch.Tensor, config: DistrConfig, causal_grouping: bool,
                         window: int | None = None) -> tuple[int, Note]:
    """``(G, why)``: ``config.group_size``, or 1 where the approximation is the identity or cannot apply.

    ``grouping="subspace"`` keeps ``G`` when there are as many queries as keys, more than one block of them, and
    ``d/G < block_size`` (a block of ``block_size`` keys spans at most that many dimensions, so a wider basis is
    the identity).
    Otherwise a sliding window keeps ``G`` only with ``sampled="q"`` and causal grouping and ``window ≥ 2·block_size``:
    then query block ``b`` is grouped by block ``b − 1``, whose rows all lie inside the window of each of ``b``'s
    queries, and keys are fused one by one, so no position outside a query's window enters its scores. (Key
    blocks straddle the window's edge, so ``sampled="k"`` would group the keys a query sees by keys it does not.)
    """
    d = q.shape[-1]
    group = config.group_size
    if group == 1:
        return 1, ("group_size=1",)
    if d % group:
        return 1, ("head_dim {} is not a multiple of group_size={}: exact", d, group)
    if config.grouping == "subspace":  # windows: the blocks a window cuts are scored exactly
        if d // group >= config.block_size:
            return 1, ("grouping='subspace' with d/G={} ≥ block_size={}: each block's basis is the identity, exact",
                       d // group, config.block_size)
        if q.shape[2] != k.shape[2]:
            return 1, ("grouping='subspace' pairs key blocks with the queries at their positions (n_q={}, n_k={}): "
                       "exact", q.shape[2], k.shape[2])
        if k.shape[2] <= config.block_size:
            return 1, ("grouping='subspace' over {} ≤ block_size keys: exact", k.shape[2])
        return group, ("G={}", group)
    if window is not None and (config.sampled == "k" or not causal_grouping or window < 2 * config.block_size):
        return 1, ("sliding window {} needs sampled='q', causal grouping and window ≥ 2·block_size: exact", window)
    rows = q.shape[2] if config.sampled == "q" else k.shape[2]
    if causal_grouping and rows <= config.block_size:
        return 1, ("causal grouping over {} ≤ block_size rows of the sampled operand: exact", rows)
    return group, ("G={}", group)


def kernel_grouping(d: int, config: DistrConfig, group: int) -> Note | None:
    """``None`` if the Triton grouping kernel computes this grouping, else why not."""
    if config.grouping != "lsh":
        return ("grouping={!r} (reference only)", config.grouping)
    if config.block_size not in BLOCK_SIZES:
        return ("block_size {} (the kernels take {})", config.block_size, BLOCK_SIZES)
    if not _power_of_two(d):
        return ("head_dim {} is not a power of two", d)
    if d > 128:
        return ("head_dim {} > 128 (the grouping kernel holds d × d tiles: at 256 an H100 run of its test did not "
                "end in 6 minutes)", d)
    if config.num_hashes > 16:
        return ("num_hashes {} > 16", config.num_hashes)
    return None


def triton_refusal(q: torch.Tensor, backend: str) -> Note | None:
    """``None`` if Triton kernels can run on ``q`` at all, else why not."""
    if not HAS_TRITON:
        return ("triton is not installed",)
    if q.device.type != "cuda" and not (INTERPRET and backend == "triton"):
        return ("device {} (the kernels need CUDA, or TRITON_INTERPRET=1 with backend='triton')", q.device.type)
    if q.dtype not in KERNEL_DTYPES:
        return ("dtype {}", q.dtype)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # under the interpreter
        return ("bfloat16 under the Triton interpreter, whose tl.dot multiplies bf16 bit patterns "
                "(triton-lang/triton#11584): float16 or float32 there",)
    if not 16 <= q.shape[-1] <= 256:
        return ("head_dim {} (the kernels take 16-256)", q.shape[-1])
    return None


@functools.cache
def _hopper(device: int) -> bool:
    return (torch.cuda.get_device_capability(device) == (9, 0)
            and importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None)


def _on_hopper(q: torch.Tensor) -> bool:
    """``q`` is on an sm_90 GPU and Triton has Gluon's Hopper dialect."""
    return q.device.type == "cuda" and _hopper(q.get_device())


def sm90_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, block_size: int, masked: bool,
                 window: int | None, softcap: float | None) -> Note | None:
    """``None`` if the Hopper kernel computes a fused-kernel call, else why the portable kernel does. It takes
    16-bit inputs on an sm_90 GPU, grouping blocks of 128 queries (its programs' rows) at ``G > 1``, strides and
    addresses in 16-byte multiples (TMA's), no mask tensor, sliding window or softcap; and it runs where it measured
    faster than the portable kernel (H100, docs/design.md P3-P4): ``G = 1``, and ``G > 1`` at head dim 128; at head
    dim 64 from :data:`SM90_MIN_KEYS_D64` keys."""
    if not SM90:
        return ("HF_DISTRATTN_SM90=0",)
    if not _on_hopper(q):
        return ("not an sm_90 GPU",)
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return ("dtype {}, head_dim {} (the sm_90 kernel takes 16-bit, 64 or 128)", q.dtype, q.shape[-1])
    if q.shape[-1] == 64 and group > 1:
        return ("head_dim 64 with G={}: the portable kernel is faster", group)
    if q.shape[-1] == 64 and k.shape[2] < SM90_MIN_KEYS_D64:
        return ("head_dim 64 at {} keys: the portable kernel is faster below {}", k.shape[2], SM90_MIN_KEYS_D64)
    if group > 1 and block_size != 128:
        return ("block_size {} (the sm_90 kernel groups 128 queries)", block_size)
    if masked or window is not None or softcap is not None:
        return ("a mask, window or softcap (the sm_90 kernel takes none)",)
    if 0 in q.shape or 0 in k.shape:
        return ("an empty input",)
    if any(t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]) for t in (q, k, v)):
        return ("strides or addresses that TMA cannot take (16-byte multiples)",)
    return None


def sm90_failed(error: Exception) -> None:
    """The Hopper kernel raised (a Triton whose Gluon it does not build on, say): one warning, and the portable
    kernel for this and every later call."""
    global SM90
    SM90 = False
    first = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(f"hf_distrattn: the sm_90 kernel failed ({type(error).__name__}: {first}); the portable kernel "
                  "runs instead (HF_DISTRATTN_SM90=0 skips the sm_90 kernel)", stacklevel=3)


def _refuse(config: DistrConfig, note: Note) -> None:
    if config.backend == "triton":
        raise ValueError("DistrConfig.backend='triton' cannot take this call: " + note[0].format(*note[1:]))


def plan(q: torch.Tensor, k: torch.Tensor, config: DistrConfig, *, causal_grouping: bool = False,
         needs_grad: bool = False, dropout_p: float = 0.0, mask_needs_grad: bool = False,
         reduced_keys: bool = False, window: int | None = None) -> Plan:
    """The path of :func:`hf_distrattn.distr_attention` for these inputs (module notes).

    ``reduced_keys``: the call has keys in reduced form from a cache layer; ``window``: a sliding window
    (:func:`effective_group_size`). Softcapping and attention sinks run on every path. ``backend="triton"`` raises
    a ValueError naming the reason when no kernel can take the call; ``"reference"`` always takes the reference.
    """
    group, why = effective_group_size(q, k, config, causal_grouping, window)
    if dropout_p > 0 or (needs_grad and mask_needs_grad):
        note = ("attention dropout (reference only)",) if dropout_p > 0 else ("a mask that needs a gradient",)
        _refuse(config, note)
        return Plan("reference-autograd", group, (why, note))
    subspace = group > 1 and config.grouping == "subspace"
    reduced = (reduced_keys and group > 1 and config.sampled == "k" and causal_grouping and not needs_grad
               and not subspace)
    refusal = ("backend='reference'",) if config.backend == "reference" else triton_refusal(q, config.backend)
    if refusal is not None:
        _refuse(config, refusal)
        return Plan("reduced-reference" if reduced else "reference", group, (why, refusal))
    d, n_q = q.shape[-1], q.shape[2]
    if subspace:
        if config.block_size not in BLOCK_SIZES or not _power_of_two(d):
            note = ("block_size {}, head_dim {} (the kernels take {} and powers of two)", config.block_size, d,
                    BLOCK_SIZES)
        elif needs_grad and window is not None:
            note = ("grouping='subspace' gradients with a sliding window (reference only)",)
        elif needs_grad:
            return Plan("subspace", group, (why, ("gradients: subspace pre-pass kernel, fused kernel forward, "
                                                  "backward kernels on K or K̃ per tile",)))
        else:
            return Plan("fused", group, (why, ("subspace pre-pass kernel, fused kernel, first, own and "
                                               "neighbouring key blocks exact",)))
        _refuse(config, note)
        return Plan("reference", group, (why, note))
    rows = q.shape[1] // k.shape[1] * n_q
    decodes = n_q <= MAX_DECODE_QUERIES and rows <= MAX_DECODE_ROWS and _power_of_two(d)
    grouping = None if group == 1 else kernel_grouping(d, config, group)
    if needs_grad:
        if grouping is None and (group == 1 or config.reduce == "rank1"):
            return Plan("projected", group, (why, ("gradients: grouping kernel, exact kernels forward and backward",)))
        return Plan("approximated", group, (why, ("gradients",), grouping or ("reduce={!r}", config.reduce)))
    if reduced and decodes and grouping is None:
        return Plan("reduced-decode", group, (why, ("{} queries over keys held reduced", n_q)))
    if group == 1:
        return Plan("decode", 1, (why, ("{} queries: split-KV", n_q))) if decodes else \
            Plan("fused", 1, (why, ("exact kernel",)))
    if config.sampled == "q" and grouping is None and config.block_size in BLOCK_SIZES:
        return Plan("fused", group, (why, ("fused d/G kernel",)))
    if (config.sampled == "q" and config.grouping == "pca" and config.block_size in BLOCK_SIZES
            and _power_of_two(d)):
        return Plan("fused", group, (why, ("pca bases by PyTorch subspace iteration, fused d/G kernel",)))
    if group > 1 and grouping is None and config.reduce == "rank1":
        return Plan("projected", group, (why, ("sampled='k': K̃ = K·M by the grouping kernel, exact kernel",)))
    note = grouping or ("reduce={!r}", config.reduce)
    return Plan("approximated", group, (why, note, ("X̃ by the PyTorch grouping, exact kernel",)))


def plan_reduce_keys(keys: torch.Tensor, config: DistrConfig) -> str:
    """``"kernel"`` or ``"reference"``: how a cache layer reduces new keys (:func:`hf_distrattn.ops.reduce_keys`)."""
    if config.backend == "reference" or triton_refusal(keys, config.backend) is not None:
        return "reference"
    return "reference" if kernel_grouping(keys.shape[-1], config, config.group_size) else "kernel"
