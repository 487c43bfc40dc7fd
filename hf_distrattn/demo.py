"""``hf-distrattn demo``: greedy generation with ``sdpa`` and with ``distr``, side by side.

For each attention setting: the generated text, which implementation the layers run, the generated tokens'
agreement with the first setting's, the largest difference of the prompt's logits from the first setting's, and
the time per generated token.
"""

from __future__ import annotations

import time
from importlib import resources

import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .integration import layer_plans
from .settings import apply_setting, check_model, parse_settings, pick_device, pick_dtype


def load_config(name: str = "demo-llama.yaml") -> dict:
    """A YAML file bundled in ``configs/``."""
    return yaml.safe_load(resources.files("hf_distrattn.configs").joinpath(name).read_text())


def load_model(model: str | None, settings: dict, device: str, dtype: torch.dtype):
    """The checkpoint ``model`` (hub id or path) with its tokenizer, or the bundled random-weight Llama."""
    if model is None:
        config = AutoConfig.for_model(**settings["model"])
        torch.manual_seed(settings.get("seed", 0))
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return lm.to(device).eval(), None
    check_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval(), tokenizer
    except OSError as error:
        raise ValueError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None


def prompt_ids(prompt: str, tokenizer, vocab_size: int) -> torch.Tensor:
    if tokenizer is None:
        return torch.tensor([[b % vocab_size for b in prompt.encode()]])
    return tokenizer(prompt, return_tensors="pt").input_ids


def paths_summary(rows: list[dict]) -> str:
    """``"prefill fused ×16, decode decode ×16"``: how many layers take each path (:func:`layer_plans`)."""
    parts = []
    for stage in ("prefill", "decode"):
        counts = {}
        for row in rows:
            if stage in row:
                counts[row[stage]] = counts.get(row[stage], 0) + 1
        if counts:
            parts.append(f"{stage} " + " + ".join(f"{path} ×{n}" for path, n in counts.items()))
    return ", ".join(parts)


@torch.no_grad()
def run_demo(model: str | None = None, attn: list[str] | None = None, prompt: str | None = None,
             new_tokens: int | None = None, device: str | None = None, dtype: str = "auto") -> dict:
    settings = load_config()
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    specs = parse_settings(attn or settings["attn"])
    new_tokens = new_tokens or settings["new_tokens"]
    lm, tokenizer = load_model(model, settings, device, torch_dtype)
    ids = prompt_ids(prompt or settings["prompt"], tokenizer, lm.config.vocab_size).to(device)
    rows, first = [], None
    for spec, name, config in tqdm(specs, desc="attention settings", unit="setting"):
        apply_setting(lm, name, config)
        logits = lm(ids).logits.float()
        start = time.perf_counter()
        out = lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=lm.config.eos_token_id or 0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = out[0, ids.shape[1]:]
        first = first or {"logits": logits, "tokens": tokens}
        path = "sdpa" if config is None else paths_summary(layer_plans(lm, ids.shape[1]))
        rows.append({
            "attn": spec,
            "path": path,
            "token_agreement": (tokens == first["tokens"]).float().mean().item(),
            "max_logit_diff": (logits - first["logits"]).abs().max().item(),
            "ms_per_token": 1000 * seconds / new_tokens,
            "text": tokenizer.decode(tokens) if tokenizer is not None else None,
            "tokens": tokens.tolist(),
        })
    return {"model": model or "configs/demo-llama.yaml (random weights)", "device": device,
            "dtype": str(torch_dtype), "prompt": prompt or settings["prompt"], "prompt_tokens": ids.shape[1],
            "new_tokens": new_tokens, "rows": rows}


def format_table(result: dict) -> str:
    head = f"model: {result['model']}  device: {result['device']}  dtype: {result['dtype']}  " \
           f"prompt: {result['prompt_tokens']} tokens  generated: {result['new_tokens']} tokens (greedy)"
    lines = [head, f"prompt: {result['prompt']!r}", ""]
    for r in result["rows"]:
        shown = repr(r["text"]) if r["text"] is not None else "token ids " + " ".join(map(str, r["tokens"][:16]))
        lines.append(f"{r['attn']}: {shown}")
    lines += ["", "| attention | path | token agreement | max logit diff | ms/token |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['attn']} | {r['path']} | {r['token_agreement']:.0%} | {r['max_logit_diff']:.2e} "
                     f"| {r['ms_per_token']:.1f} |")
    first = result["rows"][0]["attn"]
    lines += ["",
              "path: the implementation the layers run for the prompt (prefill) and each new token (decode).",
              f"token agreement: share of generated tokens equal to {first}'s, position by position.",
              f"max logit diff: the largest |logit − {first}'s logit| over the prompt's positions and the vocabulary "
              "(float rounding for exact settings; an approximation moves it by whole logits while the top token, "
              "what greedy decoding keeps, often stays).",
              "ms/token: wall time of generate() over the new tokens (the prefill included)."]
    return "\n".join(lines)
