"""The Triton training path (the ``hf_distrattn::attention`` op on its ``"projected"`` path + ``kernels/backward.py``)
against the float64 reference: same approximation, so the gradients must agree to rounding; at G=1 against SDPA's.

On CPU under TRITON_INTERPRET=1 (as CI runs them), compiled on a GPU.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DEVICE, MASK_KINDS, make_mask, rand

from hf_distrattn import DistrConfig, api, distr_attention
from hf_distrattn.plan import plan

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)



def grads(q, k, v, dout, **kw):
    """``(out, dq, dk, dv)`` of ``distr_attention`` for fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = distr_attention(*leaves, **kw)
    out.backward(dout.to(out.dtype))
    return (out.detach(), *(t.grad for t in leaves))


def assert_matches_float64_reference(q, k, v, tol, **kw):
    """out, dK, dV (dQ, dK and dV when K is sampled: the un-approximated operands) elementwise against the
    float64 reference. The approximated operand's gradient runs through the rank-1 factors' power iteration,
    which float32 and float64 round differently in near-degenerate groups (up to 2e-2 apart in one element
    for the reference itself), so it is compared elementwise with the float32 reference (same rounding of
    the grouping) and in norm with float64."""
    config = kw.pop("config")
    dout = rand(*q.shape, seed=99)
    causal_grouping = kw.get("causal_grouping", kw.get("causal", False))
    assert plan(q, k, config, needs_grad=True, causal_grouping=causal_grouping).path == "projected"
    mine = grads(q, k, v, dout, config=config, **kw)
    ref32 = grads(q, k, v, dout, config=config.replace(backend="reference"), **kw)
    mask = kw.pop("attn_mask", None)
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref = grads(q.double(), k.double(), v.double(), dout.double(), attn_mask=mask,
                config=config.replace(backend="reference"), **kw)
    approximated = -1 if config.exact else {"q": 1, "k": 2}[config.sampled]
    for i, (name, a, b) in enumerate(zip(("out", "dq", "dk", "dv"), mine, ref, strict=True)):
        assert not a.isnan().any(), name
        if i == approximated:
            torch.testing.assert_close(a, ref32[i], atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
            assert ((a.double() - b).norm() / b.norm()).item() < 5 * tol, name
        else:
            torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


CASES = [  # group, sampled, block, head_dim, causal, n_q, n_k, heads (q, kv)
    (1, "q", 64, 64, False, 37, 37, (4, 4)),
    (1, "q", 64, 32, True, 70, 70, (4, 2)),
    (1, "q", 64, 80, True, 20, 33, (3, 1)),  # padded head dim, decode-shaped causal offset
    (2, "q", 16, 64, True, 37, 37, (4, 2)),
    (2, "k", 16, 64, True, 45, 45, (2, 1)),
    (4, "q", 32, 128, False, 18, 50, (2, 2)),
    (2, "q", 16, 64, True, 50, 30, (2, 2)),  # more queries than keys: the first rows see nothing
    (2, "q", 128, 64, True, 150, 150, (2, 1)),  # backward tiles inside one grouping block (above: spanning several)
    (1, "q", 16, 32, True, 40, 40, (10, 5)),  # 20 / 10 batch·heads: partial groups of the tile order
]


@pytest.mark.parametrize("group,sampled,block,d,causal,n_q,n_k,heads", CASES)
def test_backward_matches_reference(group, sampled, block, d, causal, n_q, n_k, heads):
    q, k, v = rand(2, heads[0], n_q, d, seed=1), rand(2, heads[1], n_k, d, seed=2), rand(2, heads[1], n_k, d, seed=3)
    config = DistrConfig(grouping="lsh", group_size=group, sampled=sampled, block_size=block, backend="triton")
    assert_matches_float64_reference(q, k, v, 2e-4, causal=causal, config=config)


@pytest.mark.parametrize("block,d,causal,mask,dtype,n", [
    (32, 32, True, None, torch.float32, 100),
    (64, 64, False, "padding", torch.float32, 250),  # encoders: the own block inside the unmasked tiles
    (128, 64, True, None, torch.float16, 400),  # 64-row tiles inside a block of 128
])
def test_subspace_backward_kernels_match_the_reference(block, d, causal, mask, dtype, n):
    """``grouping="subspace"`` with gradients: the fused forward, then the backward kernels reading ``K`` on the
    first, the own and the neighbouring key blocks and ``K̃ = K M_c`` elsewhere, ``dK̃`` mapped back by ``M_cᵀ``;
    against the reference (float32 products of the same maps; half precision in norm), GQA."""
    b = 1 if mask is None else 2  # padding: the second sequence 20 long
    q, k, v = (rand(b, h, n, d, seed=20 + h).to(dtype) for h in (4, 2, 3))
    v = v[:, :2]
    attn_mask = None if mask is None else make_mask(mask, b, 4, n)
    config = DistrConfig(group_size=2, block_size=block, grouping="subspace", sampled="k", backend="triton")
    assert plan(q, k, config, needs_grad=True, causal_grouping=causal).path == "subspace"
    dout = rand(b, 4, n, d, seed=25)
    mine = grads(q, k, v, dout, causal=causal, attn_mask=attn_mask, config=config)
    ref = grads(q.float(), k.float(), v.float(), dout, causal=causal, attn_mask=attn_mask,
                config=config.replace(backend="reference"))
    exact = grads(q.float(), k.float(), v.float(), dout, causal=causal, attn_mask=attn_mask,
                  config=config.replace(group_size=1, backend="reference"))
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), mine, ref, exact, strict=True):
        assert a.dtype == dtype and not a.isnan().any(), name
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert ((a.float() - b).norm() / b.norm()).item() < 2e-3, name
        assert (b - e).norm() > 1e-2 * e.norm(), name  # the approximation is on


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_backward_masks(kind):
    b, h, n, d = 2, 2, 33, 32
    q, k, v = rand(b, h, n, d, seed=4), rand(b, h, n, d, seed=5), rand(b, h, n, d, seed=6)
    mask = make_mask(kind, b, h, n)
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16, backend="triton")
    assert_matches_float64_reference(q, k, v, 2e-4, causal=kind != "additive", attn_mask=mask, config=config,
                                     causal_grouping=True)


def test_exact_backward_matches_sdpa():
    q, k, v = rand(2, 4, 40, 64, seed=10), rand(2, 2, 40, 64, seed=11), rand(2, 2, 40, 64, seed=12)
    dout = rand(2, 4, 40, 64, seed=13)
    mine = grads(q, k, v, dout, causal=True, config=DistrConfig(group_size=1, backend="triton"))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    out.backward(dout)
    for a, b in zip(mine, (out.detach(), *(t.grad for t in leaves)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half_precision(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16); runs on GPU")
    q, k, v = (rand(1, 4, 96, 64, dtype=dtype, seed=s) for s in (14, 15, 16))
    config = DistrConfig(grouping="lsh", group_size=2, block_size=32, backend="triton")
    dout = rand(1, 4, 96, 64, seed=17)
    mine = grads(q, k, v, dout, causal=True, config=config)
    ref = grads(q.double(), k.double(), v.double(), dout.double(), causal=True,
                config=config.replace(backend="reference"))
    for a, b in zip(mine, ref, strict=True):
        assert a.dtype == dtype
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2


def test_dropout_runs_the_differentiable_reference_with_one_warning():
    q = rand(1, 2, 8, 32).requires_grad_()
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16)
    with pytest.raises(ValueError, match="dropout"):
        distr_attention(q, q, q, dropout_p=0.1, config=config.replace(backend="triton"))
    assert plan(q, q, config, needs_grad=True, dropout_p=0.1).path == "reference-autograd"
    api._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = distr_attention(q, q, q, dropout_p=0.5, config=config)
        out.sum().backward()
        distr_attention(q, q, q, dropout_p=0.1, config=config).sum().backward()
    assert not torch.allclose(out, distr_attention(q, q, q, config=config)) and torch.isfinite(q.grad).all()
    assert sum("dropout" in str(w.message) for w in caught) == (DEVICE == "cuda")


@pytest.mark.parametrize("causal,kind", [(True, None), (False, "bool")])
def test_backward_tiles_need_not_be_square(causal, kind):
    """Key tiles of ``_dkdv`` wider than its query steps, query tiles of ``_dq`` taller than its key steps: the
    causal tile ranges (which query tiles see a key tile, which key tiles a query tile sees fully) must not
    assume square tiles. Same gradients as the default launch, GQA, lengths that fill no tile."""
    from hf_distrattn.kernels import backward, prefill

    q = rand(1, 4, 45, 32, seed=1, dtype=torch.float16)
    k, v = rand(1, 2, 45, 32, seed=2, dtype=torch.float16), rand(1, 2, 45, 32, seed=3, dtype=torch.float16)
    mask = make_mask(kind, 1, 4, 45) if kind else None
    out, lse = prefill.distr_attention_triton(q, k, v, causal=causal, attn_mask=mask, config=DistrConfig(group_size=1))
    dout = rand(*q.shape, seed=4, dtype=torch.float16)
    call = dict(causal=causal, attn_mask=mask, scale=32**-0.5)
    square = backward.attention_backward(q, k, v, out, lse, dout, **call)
    wide = backward.attention_backward(q, k, v, out, lse, dout, **call, dkdv=dict(block_m=16, block_n=32),
                                       dq=dict(block_m=32, block_n=16))
    for name, a, b in zip(("dq", "dk", "dv"), wide, square, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("layout", ["transformers", "strided_head_dim"])
def test_strided_inputs(layout, group):
    """Transformers' layout (``(B, N, H, d)`` buffers viewed as ``(B, H, N, d)``) and a head dim with a non-unit
    stride give what contiguous copies give, with and without gradients. In Transformers' layout the output and
    the gradients keep the inputs' strides, so that transposing the output back to ``(B, N, H, d)`` is free."""
    b, n, d = 1, 40, 32

    def make(heads, seed):
        if layout == "transformers":
            return rand(b, n, heads, d, seed=seed).transpose(1, 2)
        return rand(b, heads, d, n, seed=seed).transpose(2, 3)

    q, k, v = make(4, 1), make(2, 2), make(2, 3)
    config = DistrConfig(grouping="lsh", group_size=group, block_size=16, backend="triton")
    dout = rand(b, 4, n, d, seed=9)
    mine = grads(q, k, v, dout, causal=True, config=config)
    ref = grads(q.contiguous(), k.contiguous(), v.contiguous(), dout, causal=True, config=config)
    with torch.no_grad():
        inference = distr_attention(q, k, v, causal=True, config=config)
    for a, r in zip((inference, *mine), (ref[0], *ref), strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    if layout == "transformers":
        assert inference.stride() == mine[0].stride() == q.stride()
        assert [g.stride() for g in mine[1:]] == [t.stride() for t in (q, k, v)]
