"""Every common Transformers family takes ``attn_implementation="distr"``: tiny random models of each, float32.

G=1 must be exact: logits equal ``eager``'s (and ``sdpa``'s where it serves the model's features), greedy tokens
equal with the dynamic and the static cache and in a left-padded batch. Sliding windows are shorter than the
inputs, so they matter, and the features reach the attention function (checked, so that a model passing none
would fail here). G=2 (windows of at least two blocks, so that the windowed layers approximate too) must be finite,
differ from exact and stay below a relative error of 1 in the logits (random weights: Gemma 3's, with QK-norm,
reach 0.6; a bound on the scale, not a quality claim: quality is measured on trained models in test_models.py).
On a GPU the same tests run the Triton kernels (``backend="auto"``).
"""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_distrattn.integration
from hf_distrattn import DistrConfig, configure

WINDOW = 12
SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
DECODERS = {  # family: (config, the features its attention function must receive)
    "llama": ({}, set()),
    "mistral": ({"sliding_window": WINDOW}, {"window"}),
    "qwen2": ({"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, {"window"}),
    "qwen3": ({"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}, {"window"}),
    "gemma2": ({"sliding_window": WINDOW, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": None}, {"window", "softcap"}),
    "gemma3_text": ({"sliding_window": WINDOW, "query_pre_attn_scalar": 32, "sliding_window_pattern": 2},
                    {"window"}),
    "phi3": ({"sliding_window": WINDOW, "pad_token_id": 0}, {"window"}),
    "gpt_oss": ({"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}, {"window", "sinks"}),
    "olmo2": ({}, set()),
}
EXACT = DistrConfig(group_size=1)
IDS = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))


def decoder(family, attn, **changes):
    extra, _ = DECODERS[family]
    config = AutoConfig.for_model(family, **SIZES, **(extra | changes))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture
def features_seen(monkeypatch):
    """The features (window, softcap, sinks) that reached ``distr_attention`` from the models."""
    seen = set()
    inner = hf_distrattn.integration.distr_attention

    def spy(*args, **kwargs):
        seen.update(name for name in ("window", "softcap", "sinks") if kwargs.get(name) is not None)
        return inner(*args, **kwargs)

    monkeypatch.setattr(hf_distrattn.integration, "distr_attention", spy)
    return seen


def greedy(model, ids, mask=None, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_decoder_exact_at_g1(family, features_seen):
    eager, distr = decoder(family, "eager"), decoder(family, "distr")
    configure(distr, EXACT)
    reference = eager(IDS).logits
    torch.testing.assert_close(distr(IDS).logits, reference, atol=1e-4, rtol=1e-4)
    assert features_seen == DECODERS[family][1]
    if family not in ("gemma2", "gpt_oss"):  # SDPA has no softcap and no sinks
        torch.testing.assert_close(decoder(family, "sdpa")(IDS).logits, reference, atol=1e-4, rtol=1e-4)
    prompt = IDS[:1, :30]
    tokens = greedy(eager, prompt)
    assert torch.equal(greedy(distr, prompt), tokens)
    assert torch.equal(greedy(distr, prompt, cache_implementation="static"), tokens)
    padded = IDS[:, :30].clone()
    mask = torch.ones_like(padded)
    padded[1, :7], mask[1, :7] = 0, 0  # left padding
    assert torch.equal(greedy(distr, padded, mask), greedy(eager, padded, mask))


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_decoder_approximates_at_g2(family):
    window = {"sliding_window": 36} if "sliding_window" in DECODERS[family][0] else {}
    ids = torch.randint(3, 97, (2, 64), generator=torch.Generator().manual_seed(2))
    reference = decoder(family, "eager", **window)(ids).logits
    distr = decoder(family, "distr", **window)
    configure(distr, DistrConfig(grouping="lsh", group_size=2, block_size=16))
    logits = distr(ids).logits
    assert torch.isfinite(logits).all()
    error = ((logits - reference).norm() / reference.norm()).item()
    assert 1e-5 < error < 1.0


ENCODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)
VISION = dict(image_size=32, patch_size=4)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TEXT_MASK = (torch.arange(40) < torch.tensor([[40], [30]])).long()  # the second sequence padded after 30 tokens


def encoder(family, attn):
    if family in ("clip", "siglip"):
        config = AutoConfig.for_model(family, text_config=dict(vocab_size=97, max_position_embeddings=64, **ENCODER),
                                      vision_config=ENCODER | VISION)
    else:
        config = AutoConfig.for_model(family, **ENCODER, **(VISION if family in ("vit", "deit") else
                                                            dict(vocab_size=97)))
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def embed(family, model):
    if family in ("vit", "deit"):
        return model(pixel_values=PIXELS).last_hidden_state
    if family == "bert":
        return model(input_ids=IDS, attention_mask=TEXT_MASK).last_hidden_state
    out = model(input_ids=IDS, pixel_values=PIXELS, attention_mask=TEXT_MASK if family == "clip" else None)
    return torch.cat([out.text_embeds, out.image_embeds], -1)


@pytest.mark.parametrize("family", ["vit", "deit", "bert", "clip", "siglip"])
@torch.no_grad()
def test_encoder_exact_at_g1_and_approximate_at_g2(family):
    reference = embed(family, encoder(family, "eager"))
    distr = encoder(family, "distr")
    configure(distr, EXACT)
    torch.testing.assert_close(embed(family, distr), reference, atol=1e-4, rtol=1e-4)
    configure(distr, DistrConfig(grouping="lsh", group_size=2, block_size=16))
    approximate = embed(family, distr)
    assert torch.isfinite(approximate).all()
    assert ((approximate - reference).norm() / reference.norm()).item() < 1.0
    assert not torch.allclose(approximate, reference, atol=1e-7, rtol=0)


def test_paths_name_the_windowed_layers_that_run_exact():
    """``hf-distrattn paths`` (``layer_plans``): Gemma 2's sliding layers with ``sampled="k"`` run exact, saying why;
    its full layers keep G=2 and reduced keys in the cache."""
    from hf_distrattn.integration import layer_plans

    model = decoder("gemma2", "distr", sliding_window=36)
    configure(model, DistrConfig(grouping="lsh", group_size=2, block_size=16, sampled="k"))
    rows = layer_plans(model, 200)
    windowed = [m.sliding_window is not None for m in hf_distrattn.integration.attention_modules(model)]
    assert windowed == [True, False]
    assert "sliding window 36" in rows[0]["prefill_reason"] and "sliding window" in rows[0]["decode_reason"]
    assert rows[1]["prefill_reason"].startswith("G=2") and rows[1]["decode"] == "reduced-reference"


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
@torch.no_grad()
def test_windows_softcap_and_sinks_through_the_kernels(family):
    """The same models on the Triton kernels (``backend="triton"``; the interpreter on a CPU): at G=1 eager's
    logits (and Gemma 2's tokens: the decode kernel with a window and softcap); at G=2 (windows of 36, blocks of
    16) the reference's logits."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager, distr = decoder(family, "eager").to(device), decoder(family, "distr").to(device)
    configure(distr, DistrConfig(group_size=1, backend="triton"))
    ids = IDS.to(device)
    torch.testing.assert_close(distr(ids).logits, eager(ids).logits, atol=1e-4, rtol=1e-4)
    if family == "gemma2":
        assert torch.equal(greedy(distr, ids[:1, :30]), greedy(eager, ids[:1, :30]))
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(2)).to(device)
    distr = decoder(family, "distr", sliding_window=36).to(device)
    configure(distr, DistrConfig(grouping="lsh", group_size=2, block_size=16, backend="reference"))
    reference = distr(ids).logits
    configure(distr, DistrConfig(grouping="lsh", group_size=2, block_size=16, backend="triton"))
    torch.testing.assert_close(distr(ids).logits, reference, atol=1e-4, rtol=1e-4)
