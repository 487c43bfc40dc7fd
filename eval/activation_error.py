r"""Attention-output error on real activations: ``q, k, v`` captured from every attention layer of a trained
model (one text window, or one batch of images), then each attention setting against exact attention on them.

For layer ``ℓ`` with captured ``(Q, K, V)``: ``err_ℓ = ‖A_s(Q, K, V) − A(Q, K, V)‖_F / ‖A(Q, K, V)‖_F`` in
float32 (``A`` exact, ``A_s`` the setting; Triton kernels on CUDA, else the reference), causal where the layer is.
Per-layer errors isolate the kernel's approximation from how errors compound through a network (what the
perplexity and accuracy evals measure).

    python -m hf_distrattn.eval.activation_error --lm ../shared/models/ref-llama-bytes \
        --text-file ../shared/data/heldout_kjv.txt --vit ../shared/models/ref-vit-fmnist \
        --dataset ../shared/data/fashion-mnist-test.parquet --attn distr:group_size=2,grouping=lsh \
        --attn distr:group_size=4,grouping=lsh
"""

from __future__ import annotations

import argparse

import torch

from ..api import distr_attention
from ..config import EXACT, DistrConfig
from ..settings import parse_settings, pick_device
from .common import EvalError, write_results

CAPTURE = "hf_distrattn_capture"
DEFAULT_SPECS = ["distr:group_size=2,grouping=lsh", "distr:group_size=4,grouping=lsh",
                 "distr:group_size=2,block_size=16,grouping=lsh", "distr:group_size=4,block_size=16,grouping=lsh",
                 "distr:group_size=2,grouping=random",
                 "distr:group_size=2,grouping=truncate", "distr:group_size=2,grouping=match"]


def capture(model, inputs: dict) -> list[dict]:
    """Run ``model(**inputs)`` with exact SDPA, recording each attention call's float32 q, k, v, mask, scale and
    causality (the arguments ``distr_attention`` gets from :mod:`hf_distrattn.integration`)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    calls = []

    def record(module, query, key, value, attention_mask, **kwargs):
        module_causal = bool(getattr(module, "is_causal", False))
        calls.append({"q": query.float(), "k": key.float(), "v": value.float(), "mask": attention_mask,
                      "scale": kwargs.get("scaling"), "causal_grouping": module_causal,
                      "causal": module_causal and attention_mask is None and query.shape[2] > 1})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, record)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation(previous)
    return calls


@torch.no_grad()
def attend(call: dict, config: DistrConfig) -> torch.Tensor:
    """``distr_attention`` on a captured call, with the arguments the ``"distr"`` glue would pass."""
    return distr_attention(call["q"], call["k"], call["v"], causal=call["causal"], attn_mask=call["mask"],
                           scale=call["scale"], config=config, causal_grouping=call["causal_grouping"])


def layer_errors(calls: list[dict], exact: list[torch.Tensor], config: DistrConfig) -> list[float]:
    """``err_ℓ`` of ``config`` for each captured call, against its exact output."""
    return [((attend(call, config) - ref).norm() / ref.norm()).item() for call, ref in zip(calls, exact, strict=True)]


def lm_inputs(model_path: str, text_file: str, seq_len: int, device: str) -> tuple[object, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .perplexity import load_text

    text = load_text(text_file, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except OSError as error:
        raise EvalError(f"cannot load model {model_path!r}: {str(error).splitlines()[0]}") from None
    ids = tokenizer(text[: 8 * seq_len], return_tensors="pt")["input_ids"][:, :seq_len]
    return model.to(device).eval(), {"input_ids": ids.to(device)}


def vit_inputs(model_path: str, dataset: str, images: int, device: str) -> tuple[object, dict]:
    from .vit import Classifier, load_images

    rows = load_images(dataset, images, "image", "label")
    classifier = Classifier(model_path, device, torch.float32)
    return classifier.model, {"pixel_values": classifier.pixels(rows["image"]).to(device)}


def measure(name: str, model, inputs: dict, specs: list[str]) -> list[dict]:
    calls = capture(model, inputs)
    exact = [attend(call, EXACT) for call in calls]
    rows = []
    for spec, implementation, config in parse_settings(specs):
        if implementation != "distr":
            raise EvalError(f"activation errors compare distr settings with exact attention, got {spec!r}")
        errors = layer_errors(calls, exact, config)
        rows.append({"model": name, "setting": spec, "mean_rel_err": sum(errors) / len(errors),
                     "max_rel_err": max(errors), "layers": errors})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["Attention-output relative error on captured activations (mean / worst layer)", "",
             "| model | setting | mean | worst layer |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['setting']} | {r['mean_rel_err']:.4f} | {r['max_rel_err']:.4f} |" for r in rows]
    return "\n".join(lines)


def run(lm=None, text_file=None, seq_len=2048, vit=None, dataset=None, images=16, specs=None,
        device=None) -> list[dict]:
    device = pick_device(device)
    specs = specs or DEFAULT_SPECS
    rows = []
    if lm:
        if not text_file:
            raise EvalError("--lm needs --text-file")
        rows += measure(lm, *lm_inputs(lm, text_file, seq_len, device), specs)
    if vit:
        if not dataset:
            raise EvalError("--vit needs --dataset")
        rows += measure(vit, *vit_inputs(vit, dataset, images, device), specs)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", help="causal LM (hub id or path)")
    parser.add_argument("--text-file")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vit", help="image classifier (hub id or path)")
    parser.add_argument("--dataset", help="parquet file, image folder or hub dataset (as hf-distrattn vit)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--attn", action="append", help="distr settings (repeatable); default: a small grid")
    parser.add_argument("--device")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    rows = run(args.lm, args.text_file, args.seq_len, args.vit, args.dataset, args.images, args.attn, args.device)
    write_results(args.json, args.markdown, "attention error on captured activations", rows, markdown(rows))


if __name__ == "__main__":
    main()
