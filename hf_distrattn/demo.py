"""``hf-distrattn demo``: greedy generation with ``sdpa`` and with ``distr``, side by side.

For each attention setting: prefill logits against the first setting's (max abs difference), the generated
tokens' agreement with the first setting's, and the time per generated token.
"""

from __future__ import annotations

import time
from importlib import resources

import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .eval.common import apply_setting, parse_settings, pick_device, pick_dtype
from .integration import layer_plans


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
    tokenizer = AutoTokenizer.from_pretrained(model)
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval(), tokenizer


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
        })
    return {"model": model or "configs/demo-llama.yaml (random weights)", "device": device,
            "dtype": str(torch_dtype), "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "rows": rows}


def format_table(result: dict) -> str:
    head = f"model: {result['model']}  device: {result['device']}  dtype: {result['dtype']}  " \
           f"prompt: {result['prompt_tokens']} tokens  generated: {result['new_tokens']} tokens"
    lines = [head, "",
             "| attention | path | token agreement | max logit diff | ms/token |",
             "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['attn']} | {r['path']} | {r['token_agreement']:.0%} | {r['max_logit_diff']:.2e} "
                     f"| {r['ms_per_token']:.1f} |")
    return "\n".join(lines)
