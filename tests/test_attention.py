"""distr_attention against SDPA (G=1) and against the independent float64 naive formula (any G)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import naive_attention

from hf_distrattn import DistrConfig, distr_attention
from hf_distrattn.grouping import approximate_operand

EXACT = DistrConfig(group_size=1)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sdpa(q, k, v, causal=False, mask=None):
    """SDPA with bottom-right causal alignment and GQA, via an explicit boolean mask."""
    n_q, n_k = q.shape[2], k.shape[2]
    keep = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        keep = torch.arange(n_k) <= (torch.arange(n_q)[:, None] + n_k - n_q)
    bias = torch.zeros(n_q, n_k).masked_fill(~keep, float("-inf"))
    if mask is not None:
        bias = bias + (torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                       else mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


MASK_CASES = ["none", "causal", "causal_decode", "bool", "additive", "padding", "bool_and_causal"]


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_exact_matches_sdpa(case, heads):
    h_q, h_kv = heads
    n_q = 5 if case == "causal_decode" else 37
    n_k = 37 if case != "causal_decode" else 53
    q, k, v = rand(2, h_q, n_q, 64, seed=1), rand(2, h_kv, n_k, 64, seed=2), rand(2, h_kv, n_k, 64, seed=3)
    causal = case in ("causal", "causal_decode", "bool_and_causal")
    mask = None
    if case in ("bool", "bool_and_causal"):
        mask = rand(2, 1, n_q, n_k, seed=4) > -0.5
    elif case == "additive":
        mask = rand(1, h_q, n_q, n_k, seed=5)
    elif case == "padding":
        lengths = torch.tensor([n_k, n_k - 11])
        mask = (torch.arange(n_k) < lengths[:, None])[:, None, None, :]
    out, lse = distr_attention(q, k, v, causal=causal, attn_mask=mask, config=EXACT, return_lse=True)
    ref = sdpa(q, k, v, causal, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # lse is the log-sum-exp of the scaled, masked scores
    _, naive_lse = naive_attention(q, k, v, causal=causal, mask=None if mask is None else
                                   (torch.zeros(mask.shape).masked_fill(~mask, -math.inf) if mask.dtype == torch.bool
                                    else mask).expand(2, h_q, n_q, n_k))
    torch.testing.assert_close(lse.double(), naive_lse, atol=1e-4, rtol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = rand(1, 2, 6, 32), rand(1, 2, 6, 32, seed=1), rand(1, 2, 6, 32, seed=2)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    for config in (EXACT, DistrConfig(grouping="lsh", group_size=2, block_size=4)):
        out, lse = distr_attention(q, k, v, attn_mask=mask, config=config, return_lse=True)
        assert not out.isnan().any()
        assert (out[:, :, 2] == 0).all() and torch.isneginf(lse[:, :, 2]).all()
        assert torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    # causal with more queries than keys: the first queries see no key
    out = distr_attention(rand(1, 2, 8, 32), k, v, causal=True, config=EXACT)
    assert (out[:, :, :2] == 0).all() and not out.isnan().any()


def _additive(mask, shape):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    return mask.expand(shape)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), h_kv=st.integers(1, 2), rep=st.sampled_from([1, 2, 3]), n_q=st.integers(1, 40),
    extra_k=st.integers(0, 20), d=st.sampled_from([8, 16, 32]), group=st.sampled_from([1, 2, 4, 8]),
    block=st.sampled_from([4, 16, 64]), reduce=st.sampled_from(["rank1", "sample"]),
    sampled=st.sampled_from(["q", "k"]), causal=st.booleans(), causal_grouping=st.sampled_from([None, True, False]),
    mask_kind=st.sampled_from(["none", "bool", "float"]), dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_formula(batch, h_kv, rep, n_q, extra_k, d, group, block, reduce, sampled, causal,
                               causal_grouping, mask_kind, dtype, seed):
    n_k = n_q + extra_k
    h_q = h_kv * rep
    q = rand(batch, h_q, n_q, d, dtype=dtype, seed=seed)
    k = rand(batch, h_kv, n_k, d, dtype=dtype, seed=seed + 1)
    v = rand(batch, h_kv, n_k, d, dtype=dtype, seed=seed + 2)
    mask = None
    if mask_kind == "bool":
        mask = rand(batch, 1, n_q, n_k, seed=seed + 3) > -1.0
    elif mask_kind == "float":
        mask = rand(1, h_q, n_q, n_k, dtype=dtype, seed=seed + 3)
    config = DistrConfig(grouping="lsh", group_size=group, block_size=block, reduce=reduce, sampled=sampled,
                         seed=seed % 7)
    out, lse = distr_attention(q, k, v, causal=causal, attn_mask=mask, config=config, return_lse=True,
                               causal_grouping=causal_grouping)
    ref, ref_lse = naive_attention(q, k, v, causal=causal, mask=_additive(mask, (batch, h_q, n_q, n_k)),
                                   group=group, block=block, seed=seed % 7, reduce=reduce, sampled=sampled,
                                   causal_grouping=causal_grouping)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    lse_tol = 1e-5 if dtype == torch.float64 else tol  # lse is float32; float32 inputs round the grouping too
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=lse_tol, rtol=lse_tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = (rand(1, 4, 50, 64, seed=s).to(dtype) for s in range(3))
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16)
    out = distr_attention(q, k, v, causal=True, config=config)
    ref, _ = naive_attention(q, k, v, causal=True, group=2, block=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_grouping_is_exact_on_rank1_groups():
    """Adjacent columns that are positive multiples of each other share a bucket, so G=2 loses nothing."""
    base = rand(1, 2, 40, 16)
    x = torch.stack([base, 2.5 * base], -1).reshape(1, 2, 40, 32)
    torch.testing.assert_close(approximate_operand(x, DistrConfig(grouping="lsh", group_size=2, block_size=16)), x)
    twins = torch.stack([base, base], -1).reshape(1, 2, 40, 32)
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16, reduce="sample")
    torch.testing.assert_close(approximate_operand(twins, config), twins)
    # but a real G>1 approximation of unstructured data is not exact
    assert not torch.allclose(approximate_operand(base, DistrConfig(grouping="lsh", group_size=2)), base, atol=1e-2)


def test_deterministic_per_seed():
    q, k, v = (rand(1, 2, 70, 32, seed=s) for s in range(3))
    a = distr_attention(q, k, v, config=DistrConfig(grouping="lsh", group_size=4, seed=3))
    b = distr_attention(q, k, v, config=DistrConfig(grouping="lsh", group_size=4, seed=3))
    c = distr_attention(q, k, v, config=DistrConfig(grouping="lsh", group_size=4, seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rank1_beats_sampling():
    """The best rank-1 fit of each group errs less than keeping one column (correlated real-like data)."""
    latent = rand(2, 4, 128, 8)
    q = latent @ rand(8, 64, seed=9) + 0.1 * rand(2, 4, 128, 64, seed=10)
    k, v = rand(2, 4, 128, 64, seed=11), rand(2, 4, 128, 64, seed=12)
    exact = distr_attention(q, k, v, config=EXACT)
    errors = {r: (distr_attention(q, k, v, config=DistrConfig(grouping="lsh", reduce=r)) - exact).norm() / exact.norm()
              for r in ("rank1", "sample")}
    assert errors["rank1"] < errors["sample"]


BAD_CALLS = [
    (lambda q, k, v: distr_attention(q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: distr_attention(q, k[:, :, :, :16], v), "k .* and v .* same shape"),
    (lambda q, k, v: distr_attention(q, k[:, :, :, :16], v[:, :, :, :16]), "head_dim mismatch"),
    (lambda q, k, v: distr_attention(q[:, :3], k, v), r"multiple of k/v heads"),
    (lambda q, k, v: distr_attention(q, k[:1], v[:1]), "batch"),
    (lambda q, k, v: distr_attention(q, k.double(), v), "k is torch.float64"),
    (lambda q, k, v: distr_attention(q.int(), k, v), "q must be float16"),
    (lambda q, k, v: distr_attention(q, k, v, attn_mask=torch.ones(3, 9, dtype=torch.bool)), "attn_mask of shape"),
    (lambda q, k, v: distr_attention(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.int64)), "attn_mask must be"),
    (lambda q, k, v: distr_attention(q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.bool, device="meta")),
     "attn_mask is on meta"),
    (lambda q, k, v: distr_attention(q, k, v, config={"group_size": 2}), "config must be a DistrConfig"),
]


@pytest.mark.parametrize("call,message", BAD_CALLS)
def test_bad_inputs_name_the_argument(call, message):
    q, k, v = rand(2, 4, 8, 32), rand(2, 2, 9, 32), rand(2, 2, 9, 32)
    with pytest.raises((ValueError, TypeError), match=message):
        call(q, k, v)


@pytest.mark.parametrize("field,value", [("group_size", 3), ("group_size", 0), ("block_size", 0), ("num_hashes", 31),
                                         ("seed", -1), ("sampled", "v"), ("reduce", "mean"), ("backend", "cuda")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistrConfig(**{field: value})


def test_subspace_wider_than_its_blocks_is_planned_exact():
    """``d/G ≥ block_size``: a block of keys spans at most ``block_size`` dimensions, so its basis is the identity
    and the plan runs the exact path (Gemma 3's d=256 under the default G=2, blocks of 64), with the same output
    as ``G=1``. A plan that kept ``G=2`` there would run the pre-pass and the reduced kernel for nothing."""
    from hf_distrattn.plan import plan

    q, k, v = rand(1, 2, 80, 64, seed=1), rand(1, 1, 80, 64, seed=2), rand(1, 1, 80, 64, seed=3)
    wide = DistrConfig(block_size=16)  # d/G = 32 ≥ 16
    step = plan(q, k, wide, causal_grouping=True)
    assert step.group_size == 1 and "identity" in step.reason
    assert plan(q, k, DistrConfig(block_size=64), causal_grouping=True).group_size == 2  # d/G = 32 < 64
    torch.testing.assert_close(distr_attention(q, k, v, causal=True, config=wide),
                               distr_attention(q, k, v, causal=True, config=wide.replace(group_size=1)))


def test_default_is_the_subspace_grouping_on_keys_and_each_grouping_samples_its_own_operand():
    """``DistrConfig()`` (and so ``attn_implementation="distr"``) is G=2 ``"subspace"`` on the keys; other groupings
    sample the queries unless told; asking ``"subspace"`` for the queries names the way to LSH. A wrong default
    would score a causal LM's keys with the LSH grouping: on CPU the two differ on any random input."""
    assert (DistrConfig().grouping, DistrConfig().sampled, DistrConfig().group_size) == ("subspace", "k", 2)
    from hf_distrattn import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == DistrConfig() == DistrConfig.from_dict(DistrConfig().to_dict())
    assert DistrConfig(grouping="lsh").sampled == "q" and DistrConfig(grouping="lsh", sampled="k").sampled == "k"
    with pytest.raises(ValueError, match="grouping='lsh'"):
        DistrConfig(sampled="q")
    q, k, v = rand(1, 4, 80, 16, seed=1), rand(1, 2, 80, 16, seed=2), rand(1, 2, 80, 16, seed=3)
    default = distr_attention(q, k, v, causal=True, config=DistrConfig(block_size=16))
    torch.testing.assert_close(default, distr_attention(q, k, v, causal=True, config=SUBSPACE))
    lsh = distr_attention(q, k, v, causal=True, config=DistrConfig(grouping="lsh", block_size=16))
    assert (default - lsh).abs().max() > 1e-3


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown field.*group"):
        DistrConfig.from_dict({"group": 2})


def test_indivisible_head_dim_falls_back_to_exact_with_one_warning():
    q, k, v = rand(1, 2, 10, 36), rand(1, 2, 10, 36, seed=1), rand(1, 2, 10, 36, seed=2)
    config = DistrConfig(grouping="lsh", group_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = distr_attention(q, k, v, config=config)
        distr_attention(q, k, v, config=config)
    assert len([w for w in caught if str(w.message).startswith("distr_attention: head_dim 36 is not a multiple")]) == 1
    torch.testing.assert_close(out, sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_autocast_casts_float32_inputs_like_sdpa():
    """Under autocast, float32 q/k/v run in the autocast dtype (SDPA does the same), so mixed-precision training
    of a float32 model does not run float32 attention."""
    q, k, v = rand(1, 2, 20, 32, seed=1), rand(1, 2, 20, 32, seed=2), rand(1, 2, 20, 32, seed=3)
    with torch.autocast("cpu", torch.bfloat16):
        out = distr_attention(q, k, v, causal=True, config=EXACT)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    expected = distr_attention(*(t.bfloat16() for t in (q, k, v)), causal=True, config=EXACT)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_top_eigenvector_matches_eigh():
    from hf_distrattn.grouping import top_eigenvector

    x = rand(500, 16, 4, dtype=torch.float64)
    gram = x.transpose(-1, -2) @ x
    v = top_eigenvector(gram)
    ref = torch.linalg.eigh(gram).eigenvectors[..., -1]
    cos = (v * ref).sum(-1).abs()
    assert (cos > 1 - 1e-9).float().mean() > 0.99  # all but near-degenerate top pairs
    assert ((v.sum(-1) >= 0).all())
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(500, dtype=torch.float64))


def test_ablation_groupings():
    x = rand(1, 2, 40, 32)
    truncated = approximate_operand(x, DistrConfig(group_size=4, grouping="truncate"))
    assert torch.equal(truncated[..., :8], x[..., :8]) and (truncated[..., 8:] == 0).all()
    a = approximate_operand(x, DistrConfig(group_size=2, grouping="random", seed=1))
    b = approximate_operand(x, DistrConfig(group_size=2, grouping="random", seed=1))
    lsh = approximate_operand(x, DistrConfig(grouping="lsh", group_size=2))
    assert torch.equal(a, b) and not torch.allclose(a, lsh)
    # on columns that come in parallel pairs, LSH finds the pairs (exact) and a random grouping does not
    base = rand(1, 2, 40, 16, seed=3)
    pairs = torch.stack([base, 3 * base], -1).reshape(1, 2, 40, 32)
    lsh_err = (approximate_operand(pairs, DistrConfig(grouping="lsh", group_size=2, block_size=16)) - pairs).norm()
    shuffled = DistrConfig(group_size=2, block_size=16, grouping="random")
    random_err = (approximate_operand(pairs, shuffled) - pairs).norm()
    assert lsh_err < 1e-4 * pairs.norm() < random_err


@pytest.mark.parametrize("group", [2, 4])
def test_match_grouping_finds_signed_groups(group):
    """Columns that come in groups of G parallel or anti-parallel copies, shuffled: the greedy matching finds the
    groups (X̃ = X, the rank-1 fit is sign-blind); LSH's sign bits split anti-parallel copies."""
    base = rand(1, 2, 16, 32 // group, seed=5)
    signs = torch.tensor([1.0, -2.0, 0.5, -1.5][:group], dtype=base.dtype)
    x = (base[..., None] * signs).flatten(-2)[..., torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    config = DistrConfig(group_size=group, block_size=16, grouping="match")
    assert (approximate_operand(x, config) - x).norm() < 1e-6 * x.norm()
    assert (approximate_operand(x, config.replace(grouping="lsh")) - x).norm() > 0.1 * x.norm()
    from hf_distrattn.plan import kernel_grouping

    assert "reference only" in kernel_grouping(32, config, group)[0]  # an ablation: the kernels refuse it


def test_top_subspace_is_the_leading_eigenspace():
    """Subspace iteration with CholeskyQR2: the eigenspace of the largest eigenvalues where there is a gap (float64
    even for float32 input), an orthonormal basis, zero columns for a zero matrix."""
    from hf_distrattn.grouping import top_subspace

    q = torch.linalg.qr(rand(6, 32, 32, dtype=torch.float64, seed=14)).Q
    spectrum = torch.cat([torch.logspace(4, 2, 8), torch.logspace(-1, -3, 24)]).double()
    cov = (q * spectrum) @ q.transpose(-1, -2)
    p = top_subspace(cov.float(), 8)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p.transpose(-1, -2) @ p, torch.eye(8, dtype=torch.float64).expand(6, 8, 8))
    exact = q[..., :8]
    torch.testing.assert_close(p @ p.transpose(-1, -2), exact @ exact.transpose(-1, -2), atol=1e-6, rtol=0)
    assert (top_subspace(torch.zeros(2, 16, 16), 4) == 0).all()


def test_pca_projection_is_the_decayed_prefix_subspace():
    """``grouping="pca"``: rows in a rotated ``d/G``-dim subspace (no column grouping fits them) are reproduced
    exactly, causal or not; with causal grouping block ``b`` is projected on the leading subspace of
    ``Σ_{j<b} λ^(b-1-j) X_jᵀ X_j`` (built here block by block); the gradient is ``dX̃ P Pᵀ`` (P held constant)."""
    from hf_distrattn.grouping import PCA_DECAY, top_subspace
    from hf_distrattn.plan import kernel_grouping

    config = DistrConfig(group_size=2, block_size=8, grouping="pca")
    basis = torch.linalg.qr(rand(16, 8, dtype=torch.float64, seed=7)).Q
    low_rank = rand(1, 2, 40, 8, dtype=torch.float64, seed=8) @ basis.T
    for causal in (False, True):
        assert (approximate_operand(low_rank, config, causal) - low_rank).norm() < 1e-9 * low_rank.norm()
    assert (approximate_operand(low_rank, config.replace(grouping="lsh")) - low_rank).norm() > 0.1 * low_rank.norm()
    assert "reference only" in kernel_grouping(16, config, 2)[0]

    x = rand(1, 1, 40, 16, dtype=torch.float64, seed=9)
    blocks = x.view(5, 8, 16)
    cov = sum(PCA_DECAY ** (2 - j) * blocks[j].T @ blocks[j] for j in range(3))
    top = top_subspace(cov, 8)  # its own accuracy: test_top_subspace_is_the_leading_eigenspace
    torch.testing.assert_close(approximate_operand(x, config, causal=True)[0, 0, 24:32], blocks[3] @ top @ top.T)

    q = x.clone().requires_grad_()
    k, v = rand(1, 1, 40, 16, dtype=torch.float64, seed=10), rand(1, 1, 40, 16, dtype=torch.float64, seed=11)
    distr_attention(q, k, v, config=config).square().sum().backward()
    own = torch.linalg.eigh(blocks.transpose(-1, -2) @ blocks).eigenvectors[..., -8:]
    q_tilde = (blocks @ own @ own.transpose(-1, -2)).reshape(1, 1, 40, 16).requires_grad_()
    F.scaled_dot_product_attention(q_tilde, k, v).square().sum().backward()
    torch.testing.assert_close(q.grad, (q_tilde.grad.view(5, 8, 16) @ own @ own.transpose(-1, -2)).view(1, 1, 40, 16))


@pytest.mark.parametrize("grouping,reduce", [("lsh", "rank1"), ("lsh", "sample"), ("random", "rank1"),
                                             ("truncate", "rank1"), ("match", "rank1"), ("pca", "rank1")])
def test_causal_grouping_reads_no_later_row(grouping, reduce):
    """Causal grouping: row i of X̃ is a function of rows ≤ i, and the first block is X itself. The block-wise
    grouping is not causal: changing a row changes earlier rows of its block."""
    x = rand(1, 2, 40, 16)
    config = DistrConfig(group_size=4, block_size=8, grouping=grouping, reduce=reduce)
    base = approximate_operand(x, config, causal=True)
    assert torch.equal(base[:, :, :8], x[:, :, :8])
    for row in (3, 8, 13, 31):
        changed = x.clone()
        changed[:, :, row] += rand(1, 2, 16, seed=row)
        after = approximate_operand(changed, config, causal=True)
        assert torch.equal(after[:, :, :row], base[:, :, :row]), row
        assert not torch.allclose(after[:, :, row:], base[:, :, row:])
    if grouping != "truncate":
        changed = x.clone()
        changed[:, :, 13] += 1.0
        block_wise = approximate_operand(changed, config)[:, :, 8:13]
        assert not torch.equal(block_wise, approximate_operand(x, config)[:, :, 8:13])


def test_causal_calls_see_no_later_token_and_decode_exactly():
    """``causal=True`` groups causally: outputs before a changed q/k/v row stay bit-identical, and a call with at
    most ``block_size`` queries is exact attention."""
    q, k, v = rand(1, 4, 40, 32, seed=1), rand(1, 2, 40, 32, seed=2), rand(1, 2, 40, 32, seed=3)
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16)
    base = distr_attention(q, k, v, causal=True, config=config)
    for which in range(3):
        inputs = [q.clone(), k.clone(), v.clone()]
        inputs[which][:, :, 20] += 1.0
        torch.testing.assert_close(distr_attention(*inputs, causal=True, config=config)[:, :, :20],
                                   base[:, :, :20], atol=0, rtol=0)
    assert not torch.allclose(base, distr_attention(q, k, v, causal=True, config=EXACT), atol=1e-3)
    for n_q in (1, 16):
        decode = distr_attention(q[:, :, -n_q:], k, v, causal=True, config=config)
        torch.testing.assert_close(decode, sdpa(q[:, :, -n_q:], k, v, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group,sampled", [(1, "q"), (2, "q"), (4, "k")])
def test_gradients_of_the_approximation(group, sampled):
    """The reference is differentiable: gradcheck in float64 with a causal mask and GQA. With ``reduce="sample"``
    the approximation is linear once the grouping is fixed, so finite differences see the same function."""
    q = rand(1, 4, 9, 8, dtype=torch.float64, seed=1).requires_grad_()
    k = rand(1, 2, 9, 8, dtype=torch.float64, seed=2).requires_grad_()
    v = rand(1, 2, 9, 8, dtype=torch.float64, seed=3).requires_grad_()
    config = DistrConfig(grouping="lsh", group_size=group, block_size=4, sampled=sampled, reduce="sample")
    assert torch.autograd.gradcheck(lambda q, k, v: distr_attention(q, k, v, causal=True, config=config),
                                    (q, k, v), eps=1e-6, atol=1e-5)


def test_rank1_gradient_is_the_projected_gradient():
    """Rank-1 groups: ``Q̃ = Q M`` per block with ``M = Σ v vᵀ`` held constant, so ``dQ = dQ̃ M``, with ``M``
    built here from the grouping's permutation and directions."""
    from hf_distrattn.grouping import group_blocks

    config = DistrConfig(grouping="lsh", group_size=2, block_size=8)
    q = rand(1, 2, 16, 8, dtype=torch.float64, seed=4).requires_grad_()
    k, v = rand(1, 2, 16, 8, dtype=torch.float64, seed=5), rand(1, 2, 16, 8, dtype=torch.float64, seed=6)
    distr_attention(q, k, v, config=config).square().sum().backward()
    perm, _, directions = group_blocks(q.detach(), config)
    m = torch.zeros(1, 2, 2, 8, 8, dtype=torch.float64)  # (batch, heads, block, d, d)
    for j in range(4):
        cols = perm[..., 2 * j : 2 * j + 2]
        vv = directions[..., j, :]
        for a in range(2):
            for b in range(2):
                idx_a, idx_b = cols[..., a], cols[..., b]
                m[torch.arange(1)[:, None, None], torch.arange(2)[None, :, None], torch.arange(2)[None, None, :],
                  idx_a, idx_b] += vv[..., a] * vv[..., b]
    q_tilde = (q.detach().view(1, 2, 2, 8, 8) @ m).view(1, 2, 16, 8).requires_grad_()
    F.scaled_dot_product_attention(q_tilde, k, v).square().sum().backward()
    torch.testing.assert_close(q.grad, (q_tilde.grad.view(1, 2, 2, 8, 8) @ m).view(1, 2, 16, 8))
    torch.testing.assert_close(m @ m, m)  # a projection: the gradient cannot grow


def test_exact_gradients_match_sdpa():
    q, k, v = (rand(2, 4, 12, 16, seed=s).requires_grad_() for s in range(3))
    distr_attention(q, k, v, causal=True, config=EXACT).square().sum().backward()
    mine = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    for a, t in zip(mine, (q, k, v), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)


def test_group_size_equal_to_the_head_dim_warns_once():
    q, k, v = rand(1, 2, 20, 16), rand(1, 2, 20, 16, seed=1), rand(1, 2, 20, 16, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            distr_attention(q, k, v, config=DistrConfig(grouping="lsh", group_size=16, block_size=16))
    assert len([w for w in caught if str(w.message).startswith("distr_attention: DistrConfig.group_size=16")]) == 1


SUBSPACE = DistrConfig(group_size=2, block_size=16, grouping="subspace", sampled="k")


def _subspace_oracle(q, k, v, block, rank, causal, window=None):
    """Float64 loops: for each key block ``c`` the basis ``U_c`` of that block alone (its queries of every head
    sharing the key head, its keys; the package's solver, which
    :func:`test_subspace_basis_is_one_step_towards_the_least_score_error` checks); query ``i`` scores the keys of
    the first block, of its own block and its neighbours and of a block its window cuts exactly, the others as
    ``q·(U_c U_cᵀ K_c)_j``."""
    from hf_distrattn.grouping import subspace_basis

    _, h_q, n, d = q.shape
    h_kv = k.shape[1]
    rep = h_q // h_kv
    config = DistrConfig(group_size=d // rank, block_size=block, grouping="subspace", sampled="k")
    out = torch.zeros(1, h_q, n, d, dtype=torch.float64)
    for g in range(h_kv):
        projected = []
        for start in range(0, n, block):
            ks = k[:, g:g + 1, start:start + block]
            u = subspace_basis(q[:, g * rep:(g + 1) * rep, start:start + block], ks, config)[0, 0, 0, :ks.shape[2]]
            projected.append(u @ u.T @ ks[0, 0])
        projected = torch.cat(projected)
        for r in range(rep):
            h = g * rep + r
            for i in range(n):
                scores = torch.full((n,), float("-inf"), dtype=torch.float64)
                for j in range(n):
                    if (causal and j > i) or (window is not None and i - j >= window):
                        continue
                    c = j // block
                    cut = window is not None and c * block <= i - window
                    exact = abs(c - i // block) <= 1 or c == 0 or cut
                    scores[j] = q[0, h, i] @ (k[0, g, j] if exact else projected[j])
                out[0, h, i] = torch.softmax(scores * d**-0.5, 0) @ v[0, g]
    return out


@pytest.mark.parametrize("causal,window,n", [(True, None, 50), (False, None, 48), (True, 20, 50)])
def test_subspace_scores_own_block_exactly_and_other_blocks_in_their_subspace(causal, window, n):
    """``grouping="subspace"`` against the loop oracle (GQA, a partial last block, a sliding window whose cut
    blocks are scored exactly); causal, the first block's queries are exact attention."""
    q, k, v = (rand(1, h, n, 8, dtype=torch.float64, seed=s) for h, s in ((4, 1), (2, 2), (2, 3)))
    config = SUBSPACE.replace(block_size=8, group_size=2)
    out = distr_attention(q, k, v, causal=causal, config=config, window=window)
    torch.testing.assert_close(out, _subspace_oracle(q, k, v, 8, 4, causal, window))
    exact = distr_attention(q, k, v, causal=causal, config=EXACT, window=window)
    if causal:
        torch.testing.assert_close(out[:, :, :8], exact[:, :, :8])
    assert (out - exact).abs().max() > 1e-2


def test_subspace_gradients_are_the_reference_autograd_ones():
    """The op's explicit backward (``dK_c = dA_exactᵀ Q + U_c U_cᵀ dA_restᵀ Q``) equals autograd through the reference's
    forward, which the dropout path differentiates."""
    from hf_distrattn import reference

    q, k, v = (rand(1, h, 70, 16, dtype=torch.float64, seed=s).requires_grad_() for h, s in ((4, 1), (2, 2), (2, 3)))
    dout = rand(1, 4, 70, 16, dtype=torch.float64, seed=4)
    mine = torch.autograd.grad(distr_attention(q, k, v, causal=True, config=SUBSPACE), (q, k, v), dout)
    out, _ = reference.attention(q, k, v, causal=True, config=SUBSPACE, causal_grouping=True)
    for a, b in zip(mine, torch.autograd.grad(out, (q, k, v), dout), strict=True):
        torch.testing.assert_close(a, b)


def test_subspace_basis_is_one_step_towards_the_least_score_error():
    """``U`` is an orthonormal basis of ``M K_c E``, one step of subspace iteration on the block's weighted score
    matrix ``M = Σ_h S_hᵀ S_h / (tr C_q / d) + ridge K Kᵀ`` (built here in token space, as an oracle of the
    right-to-left ``d``-space products), from ``K_c``'s columns at the coordinates of largest ``A_ii (C_k)_ii``. Its
    score error ``tr((I − U Uᵀ) M (I − U Uᵀ))`` is within 1.5× the Eckart–Young bound (the sum of ``M``'s trailing
    eigenvalues). Queries live near one half of a rotated basis and the keys vary most in the other half: the start
    and the keys' own principal directions (the top eigenvectors of ``K Kᵀ``) err more than 10× the bound."""
    from hf_distrattn.grouping import SUBSPACE_RIDGE, subspace_basis

    d, rank = 16, 8
    rotation = torch.linalg.qr(rand(d, d, dtype=torch.float64, seed=4)).Q
    half = torch.arange(d) < rank
    q = (rand(1, 2, 64, d, dtype=torch.float64, seed=5) * torch.where(half, 1.0, 0.05)) @ rotation
    k = (rand(1, 1, 64, d, dtype=torch.float64, seed=6) * torch.where(half, 1.0, 3.0)) @ rotation
    u = subspace_basis(q, k, DistrConfig(group_size=2, block_size=64, grouping="subspace", sampled="k"))[0, 0, 0]
    qs, ks = q[0], k[0, 0]
    scores = qs @ ks.T
    mean = qs.square().sum() / d
    m = (scores.transpose(-1, -2) @ scores).sum(0) / mean + SUBSPACE_RIDGE * ks @ ks.T
    energy = (qs.square().sum((0, 1)) / mean + SUBSPACE_RIDGE) * ks.square().sum(0)
    start = ks[:, energy.argsort(descending=True)[:rank]]
    step = torch.linalg.qr(m @ start).Q
    torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ u.T, step @ step.T, atol=1e-5, rtol=0)

    def error(basis):
        residual = torch.eye(64, dtype=torch.float64) - basis @ basis.T
        return torch.trace(residual @ m @ residual)

    bound = torch.linalg.eigvalsh(m)[:-rank].sum()
    assert bound <= error(u) < 1.5 * bound
    keys_pca = torch.linalg.eigh(ks @ ks.T).eigenvectors[:, -rank:]
    assert error(torch.linalg.qr(start).Q) > 10 * bound and error(keys_pca) > 10 * bound


def test_subspace_is_causal_and_exact_where_it_cannot_pair_blocks():
    """Outputs before a changed q/k/v row stay bit-identical; a call with fewer queries than keys (decode, a
    continued prefill) or with one block is exact attention, with the reason in the plan; the setting refuses
    ``sampled="q"``."""
    from hf_distrattn.plan import plan

    q, k, v = rand(1, 4, 40, 16, seed=1), rand(1, 2, 40, 16, seed=2), rand(1, 2, 40, 16, seed=3)
    base = distr_attention(q, k, v, causal=True, config=SUBSPACE)
    for row in (5, 17, 33):
        changed = [t.clone() for t in (q, k, v)]
        for t in changed:
            t[:, :, row] += 1.0
        after = distr_attention(*changed, causal=True, config=SUBSPACE)
        assert torch.equal(after[:, :, :row], base[:, :, :row]), row
    tail = distr_attention(q[:, :, 30:], k, v, causal=True, config=SUBSPACE)
    torch.testing.assert_close(tail, sdpa(q[:, :, 30:], k, v, causal=True))
    assert "n_q=10, n_k=40" in plan(q[:, :, 30:], k, SUBSPACE).reason
    assert plan(q[:, :, :16], k[:, :, :16], SUBSPACE).group_size == 1
    with pytest.raises(ValueError, match="sampled='k'"):
        DistrConfig(grouping="subspace", sampled="q")
