"""The registered ops (``torch.ops.hf_distrattn``) and ``torch.compile``: ``opcheck`` of every op, whole models
compiled with ``fullgraph=True`` (no graph break, eager's outputs), generation with a static cache compiled once
(no recompilation per decode step), a compiled training step.

On CPU the ops run the PyTorch reference and the compiler backend is ``aot_eager`` (fake implementations,
functionalization and the autograd registration, without a C++ toolchain); on a GPU the kernel paths and Inductor
(with CUDA graphs for generation).
"""

import pytest
import torch
from kernel_inputs import DEVICE, rand
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

import hf_distrattn  # noqa: F401 - registers the ops and "distr"
from hf_distrattn import DistrConfig, configure, distr_attention, ops
from hf_distrattn.cache import ReducedDynamicLayer
from hf_distrattn.grouping import hash_directions

BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
CUDA = DEVICE == "cuda"


def _attention_args(path, sampled="q", mask=False, grad=True, causal=True, window=None, softcap=None,
                    grouping="lsh", block_size=16):
    q, k, v = rand(1, 4, 40, 32, seed=1), rand(1, 2, 40, 32, seed=2), rand(1, 2, 40, 32, seed=3)
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    attn_mask = (rand(1, 1, q.shape[2], 40, seed=4) > -1.0) if mask else None
    config = DistrConfig(group_size=2, block_size=block_size, sampled=sampled, grouping=grouping)
    return (q, k, v, attn_mask, hash_directions(block_size, 8, 0, DEVICE), path, causal and not mask, 32**-0.5,
            *ops.config_args(config), True, window, softcap)


@pytest.mark.parametrize("config", [DistrConfig(), DistrConfig(grouping="lsh", group_size=4, block_size=32,
                                                               num_hashes=12, seed=7, sampled="k", reduce="sample",
                                                               backend="triton")])
def test_the_config_argument_spells_every_field_the_ops_read(config):
    """An op's ``config`` string gives back the settings (all but ``backend`` and ``exact_layers``, which only
    the plan and :func:`hf_distrattn.configure` read), with ``G`` overridden where the plan made the call exact."""
    carried = config.replace(backend="auto", exact_layers=())
    assert ops.as_config(*ops.config_args(config)) == carried
    assert ops.as_config(*ops.config_args(config, exact=True)) == carried.replace(group_size=1)


OPCHECK_ATTENTION = [("reference", "q", False, None), ("reference", "k", True, None), ("reference", "q", False, 20),
                     ("reference", "subspace", False, None), ("subspace", "subspace", True, None)]
if CUDA:
    OPCHECK_ATTENTION += [("projected", "q", False, None), ("projected", "k", True, None), ("fused", "q", True, None),
                          ("fused", "q", False, 33), ("fused", "subspace", True, 33)]


@pytest.mark.parametrize("path,sampled,mask,window", OPCHECK_ATTENTION)
def test_opcheck_attention(path, sampled, mask, window):
    """``window`` cases also cap the logits (softcap 3); ``"subspace"``: that grouping, keys sampled, blocks of 32
    (wider than ``d/G = 16``: a basis, not ``U = I``); the ``"subspace"`` path runs the Triton kernels here too."""
    grad = path in ("reference", "projected", "subspace")
    softcap = None if window is None else 3.0
    grouping, sampled, block = ("subspace", "k", 32) if sampled == "subspace" else ("lsh", sampled, 16)
    torch.library.opcheck(ops.attention, _attention_args(path, sampled, mask, grad, window=window, softcap=softcap,
                                                         grouping=grouping, block_size=block))


@pytest.mark.parametrize("path", ["reference", "subspace", "projected"] if CUDA else ["reference", "subspace"])
@pytest.mark.parametrize("features", [False, True])
def test_opcheck_attention_backward(path, features):
    """``features``: a window, a softcap and a gradient reaching the log-sum-exp (attention sinks); ``"subspace"``
    takes the forward's key bases as ``wt``."""
    extra = dict(window=20, softcap=3.0) if features else {}
    if path == "subspace":
        extra |= dict(sampled="k", grouping="subspace", block_size=32)
    args = _attention_args(path, grad=False, **extra)
    out, lse, operand, wt = ops.attention(*args)
    if path == "subspace":
        assert wt.shape == (1, 2, 2, 32, 16) and wt.dtype == torch.float32
    q, k, v = (operand if path == "projected" else args[0]), args[1], args[2]
    dlse = rand(*lse.shape, seed=10) if features else None
    torch.library.opcheck(ops.attention_backward, (rand(*out.shape, seed=9), dlse, q, k, v, out, lse, wt, *args[3:]))


def _reduced_layer(config, n=40):
    layer = ReducedDynamicLayer(config)
    k, v = rand(1, 2, n, 32, seed=2), rand(1, 2, n, 32, seed=3)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.update(k[:, :, 30:], v[:, :, 30:])
    return layer


@pytest.mark.parametrize("path,window", [("reduced-reference", None), ("reduced-decode", None), ("decode", None),
                                         ("decode", 20)])
def test_opcheck_decode(path, window):
    """The decode op on each path (the kernels under the interpreter on a CPU): exact decoding passes no reduced
    tensors; logits capped (softcap 3)."""
    q = rand(1, 4, 2, 32, seed=1)
    if path == "decode":
        keys, values, reduced = rand(1, 2, 40, 32, seed=2), rand(1, 2, 40, 32, seed=3), (None,) * 3
    else:
        layer = _reduced_layer(DistrConfig(grouping="lsh", group_size=2, block_size=16, sampled="k"))
        keys, values, reduced = layer.keys, layer.values, layer.reduced
    torch.library.opcheck(ops.decode, (q, keys, values, None, *reduced, path, True, 32**-0.5, 16, window, 3.0))


@pytest.mark.parametrize("path", ["reference", "kernel"] if CUDA else ["reference"])
@pytest.mark.parametrize("write", [False, True])
def test_opcheck_reduce_keys(path, write):
    """Keys 0-39 reduced; redo 21-32 (a block begun before, a block begun in them), with ``write`` from new key and
    value rows that the op writes into the cache first."""
    config = DistrConfig(grouping="lsh", group_size=2, block_size=16, sampled="k")
    layer = _reduced_layer(config)
    start = torch.tensor(21, device=DEVICE)
    states = (rand(1, 2, 12, 32, seed=4), rand(1, 2, 12, 32, seed=5)) if write else (None, None)
    torch.library.opcheck(ops.reduce_keys, (layer.keys, layer.values, start, hash_directions(16, 8, 0, DEVICE),
                                            *layer.reduced, *states, 12, path, *ops.config_args(config)))


def tiny_llama(dtype=torch.float32):
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEVICE, dtype).eval()


LSH = DistrConfig(grouping="lsh", block_size=16)
SETTINGS = [DistrConfig(group_size=1), LSH, LSH.replace(sampled="k"), LSH.replace(group_size=4)]
TOL = dict(atol=3e-2, rtol=3e-2) if CUDA else dict(atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("config", SETTINGS, ids=lambda c: f"G{c.group_size}{c.sampled}")
def test_llama_compiles_whole_and_matches_eager(config):
    model = tiny_llama(torch.bfloat16 if CUDA else torch.float32)
    model.set_attn_implementation("distr")
    configure(model, config)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, attention_mask=mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = model(ids, attention_mask=mask).logits
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled[:, 5:].float(), eager[:, 5:].float(), **TOL)


def _traced_masks(monkeypatch, skip: str) -> list:
    """Transformers' mask skip ``skip`` turned off, as 5.17's is while tracing; the list then fills with, per
    attention call, whether it got no mask."""
    from transformers import masking_utils

    from hf_distrattn import integration

    monkeypatch.setattr(masking_utils, skip, lambda *args, **kwargs: False)
    seen = []
    real = integration.distr_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask is None)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(integration, "distr_attention", spy)
    return seen


@torch.no_grad()
def test_compiled_causal_prefill_reaches_attention_without_a_mask(monkeypatch):
    """While tracing, Transformers (5.17 with torch < 2.14) builds the causal mask even for a causal prefill with no
    padding: an ``N × N`` boolean that sends every call to the kernels' masked path, off the Hopper kernel.
    ``distr_mask`` drops it where Python values show causality alone, with eager's logits; a padding mask stays.
    Newer Transformers skip that mask themselves, so their skip is turned off here, as 5.17's is while tracing."""
    seen = _traced_masks(monkeypatch, "_ignore_causal_mask_sdpa")
    model = tiny_llama(torch.bfloat16 if CUDA else torch.float32)
    model.set_attn_implementation("distr")
    configure(model, LSH)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    eager = model(ids).logits
    for padding, unmasked in ((None, True), (torch.ones_like(ids), False)):
        seen.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(ids, attention_mask=padding).logits
        assert seen and all(unmasked == s for s in seen)
        torch.testing.assert_close(compiled, eager, **TOL)


@torch.no_grad()
def test_compiled_vit_reaches_attention_without_a_mask(monkeypatch):
    """The encoder's case of the test above: while tracing, Transformers 5.17 builds ViT's bidirectional mask, an
    all-True ``N × N`` boolean, off the Hopper kernel (the fourteenth session's compiled ViT rows). ``distr_mask``
    drops it, unless the caller forbids the skip; a padding mask stays."""
    from transformers import masking_utils

    from hf_distrattn import integration

    seen = _traced_masks(monkeypatch, "_ignore_bidirectional_mask_sdpa")
    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=128, image_size=32, patch_size=16)).to(DEVICE)
    model.eval().set_attn_implementation("distr")
    configure(model, LSH)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eager = model(pixel_values=pixels).logits
    seen.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(pixel_values=pixels).logits
    assert len(seen) == 2 and all(seen)
    torch.testing.assert_close(compiled, eager, **TOL)
    keep = dict(q_length=5, kv_length=5, mask_function=masking_utils.bidirectional_mask_function,
                allow_is_causal_skip=False, allow_is_bidirectional_skip=True, batch_size=1)
    assert integration.distr_mask(**keep) is None
    assert integration.distr_mask(**keep | dict(allow_is_bidirectional_skip=False)).all()
    padded = integration.distr_mask(**keep | dict(attention_mask=torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)))
    assert padded.shape[-2:] == (5, 5) and not padded[..., 0].any() and padded[..., 1:].all()  # padding stays


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_windows_softcap_and_sinks_compile_whole(family):
    """Gemma 2 (sliding windows, softcapping) and gpt-oss (sliding windows, sinks) at G=2: no graph break, eager's
    logits."""
    from test_model_matrix import decoder

    model = decoder(family, "distr", sliding_window=36).to(DEVICE)
    configure(model, DistrConfig(grouping="lsh", group_size=2, block_size=16))
    ids = torch.randint(3, 97, (2, 64), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(ids).logits
    tol = 1e-3 if CUDA else 1e-5
    torch.testing.assert_close(compiled, model(ids).logits, atol=tol, rtol=tol)


@torch.no_grad()
def test_vit_compiles_whole_and_matches_eager():
    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=128, image_size=64, patch_size=16))
    model = model.to(DEVICE).eval()
    model.set_attn_implementation("distr")
    configure(model, DistrConfig(grouping="lsh", group_size=2, block_size=16))
    pixels = rand(2, 3, 64, 64, seed=3)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(pixel_values=pixels).graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)(pixel_values=pixels).logits
    tol = 1e-3 if CUDA else 1e-4  # Inductor's fused kernels round differently from eager's
    torch.testing.assert_close(compiled, model(pixel_values=pixels).logits, atol=tol, rtol=tol)


@torch.no_grad()
@pytest.mark.parametrize("config", SETTINGS[1:3], ids=lambda c: f"G{c.group_size}{c.sampled}")
def test_compiled_static_cache_generation_is_one_graph_with_eager_tokens(config, monkeypatch):
    """Transformers compiles the decode step of a static-cache generation (CUDA graphs on a GPU, none skipped): one
    graph for all 12 steps (no recompilation per step), the eager tokens; a left-padded batch. The step makes no
    LSH directions (a few dozen integer ops a layer, traced; the 8B shape's first G=4-k generation took 217 s
    against G=1's 27 s on an H100 while it did)."""
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    from hf_distrattn import grouping

    traced = []
    real = grouping.counter_hash
    monkeypatch.setattr(grouping, "counter_hash",
                        lambda *args: traced.append(torch.compiler.is_compiling()) or real(*args))

    model = tiny_llama()
    model.set_attn_implementation("distr")
    configure(model, config)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  pad_token_id=0, cache_implementation="static")
    eager = model.generate(**kwargs, disable_compile=True)
    compile_config = CompileConfig(fullgraph=True, backend=BACKEND, dynamic=False)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**kwargs, compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0  # Inductor's log says why, where one was skipped
    assert torch.equal(compiled, eager)
    assert not any(traced)


def test_compiled_training_step_matches_eager():
    """Forward and backward through the op's autograd registration, compiled whole."""
    model = tiny_llama()
    model.set_attn_implementation("distr")
    configure(model, DistrConfig(grouping="lsh", group_size=2, block_size=16))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def step(run):
        model.zero_grad()
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step(model)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = step(torch.compile(model, fullgraph=True, backend=BACKEND))
    torch.testing.assert_close(compiled_loss, loss, atol=1e-4, rtol=1e-4)
    for a, b in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_compiled_function_recompiles_for_other_settings_and_dtypes():
    """A config or dtype change between calls of one compiled function recompiles: never a graph built for
    other settings."""
    compiled = torch.compile(distr_attention, fullgraph=True, backend=BACKEND)
    q, k, v = rand(1, 4, 40, 32, seed=1), rand(1, 2, 40, 32, seed=2), rand(1, 2, 40, 32, seed=3)
    for config in (LSH, LSH.replace(group_size=4), LSH.replace(block_size=32)):
        torch.testing.assert_close(compiled(q, k, v, causal=True, config=config),
                                   distr_attention(q, k, v, causal=True, config=config), atol=1e-5, rtol=1e-5)
    half = (t.double() for t in (q, k, v)) if not CUDA else (t.half() for t in (q, k, v))
    q16, k16, v16 = half
    out = compiled(q16, k16, v16, causal=True, config=DistrConfig(grouping="lsh", group_size=2, block_size=16))
    assert out.dtype == q16.dtype
    torch.testing.assert_close(out, distr_attention(q16, k16, v16, causal=True,
                                                    config=DistrConfig(grouping="lsh", group_size=2, block_size=16)))
