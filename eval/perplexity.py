"""Perplexity of a causal LM over fixed windows of a token stream, for several attention settings at once.

Windows are ``seq_len`` tokens starting every ``stride`` tokens; with ``stride < seq_len`` only the last
``stride`` tokens of each later window are scored (the usual HF sliding-window protocol), so every token after
the first is scored exactly once; with ``stride = seq_len`` (disjoint windows) each window's first token has no
context and is not scored. Loss is the mean negative log-likelihood in nats per scored token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PerplexityResult:
    nats_per_token: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2)

    @property
    def bits_per_byte(self) -> float:
        return self.nats_per_token * self.tokens / self.bytes / math.log(2)


def windows(n_tokens: int, seq_len: int, stride: int, max_windows: int | None = None):
    """``(start, end, first_scored)`` of each window; ``first_scored`` indexes inside the window."""
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 0 < stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    out, start, scored_until = [], 0, 0
    while start < n_tokens - 1 and (max_windows is None or len(out) < max_windows):
        end = min(start + seq_len, n_tokens)
        out.append((start, end, max(scored_until - start, 1) if start else 1))
        scored_until = end
        if end == n_tokens:
            break
        start += stride
    return out


def scored_bytes(tokenizer, ids: torch.Tensor, spans) -> int:
    """UTF-8 bytes of the tokens the ``windows`` spans score (the denominator of bits per byte)."""
    scored = torch.cat([ids[start + first : end] for start, end, first in spans])
    return len(tokenizer.decode(scored).encode("utf-8"))


@torch.no_grad()
def evaluate_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                        max_windows: int | None = None, n_bytes: int | None = None,
                        progress=None) -> PerplexityResult:
    """Mean NLL of ``ids`` (1-D token ids) under ``model``. ``n_bytes``: bytes the scored tokens decode to."""
    stride = seq_len if stride is None else stride
    spans = windows(ids.numel(), seq_len, stride, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start, end, first in (progress(spans) if progress else spans):
        window = ids[start:end].to(device).unsqueeze(0)
        logits = model(window).logits[0, first - 1 : -1].float()
        target = window[0, first:]
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    return PerplexityResult(total / count, count, n_bytes if n_bytes is not None else count)


def load_text(text_file: str | None, dataset: str | None, split: str = "test", column: str = "text",
              template: str | None = None) -> str:
    """A local text file, or ``NAME[:CONFIG]`` through ``datasets``: the rows' ``column``, or each row formatted
    with ``template`` (``str.format`` over its columns, e.g. ``"{query}\n{response}"``), joined by blank lines."""
    from pathlib import Path

    from .common import EvalError

    if (text_file is None) == (dataset is None):
        raise EvalError("give exactly one of --text-file and --dataset")
    if text_file is not None:
        if not Path(text_file).is_file():
            raise EvalError(f"text file not found: {text_file}")
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise EvalError(f"text file is empty: {text_file}")
        return text
    import datasets

    name, _, config = dataset.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types for "cannot get it"
        raise EvalError(f"cannot load dataset {dataset!r} (split {split!r}): {str(error).splitlines()[0]}") from None
    if template is not None:
        try:
            return "\n\n".join(template.format(**row) for row in rows)
        except KeyError as error:
            raise EvalError(f"text template {template!r} names {error}, not a column of {dataset!r} "
                            f"(columns: {rows.column_names})") from None
    if column not in rows.column_names:
        raise EvalError(f"dataset {dataset!r} has no column {column!r} (columns: {rows.column_names})")
    return "\n\n".join(rows[column])


def run_perplexity(model: str, specs: list[str], text_file: str | None = None, dataset: str | None = None,
                   split: str = "test", seq_len: int = 2048, stride: int | None = None,
                   max_windows: int | None = None, device: str | None = None, dtype: str = "auto") -> dict:
    """Every attention setting on the same windows; returns the JSON payload (results in ``specs`` order)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..settings import apply_setting, check_model, parse_settings, pick_device, pick_dtype
    from .common import EvalError, environment

    settings = parse_settings(specs)
    text = load_text(text_file, dataset, split)
    device = pick_device(device)
    check_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=pick_dtype(dtype, device)).to(device).eval()
    except OSError as error:
        raise EvalError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
    positions = getattr(lm.config, "max_position_embeddings", None)
    if positions and seq_len > positions:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({positions})")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if ids.numel() < 2:
        raise EvalError(f"the text has {ids.numel()} token(s): nothing to score")
    stride = stride or seq_len
    spans = windows(ids.numel(), seq_len, stride, max_windows)
    n_bytes = scored_bytes(tokenizer, ids, spans)
    results = []
    for spec, name, config in settings:
        apply_setting(lm, name, config)
        bar = lambda items, spec=spec: tqdm(items, desc=spec, unit="window", leave=False)  # noqa: E731
        r = evaluate_perplexity(lm, ids, seq_len, stride, max_windows, n_bytes=n_bytes, progress=bar)
        results.append({"attn": spec, "perplexity": r.perplexity, "bits_per_token": r.bits_per_token,
                        "bits_per_byte": r.bits_per_byte, "nats_per_token": r.nats_per_token,
                        "tokens": r.tokens, "bytes": r.bytes})
    return {"task": "perplexity", "model": model, "text_file": text_file, "dataset": dataset, "split": split,
            "seq_len": seq_len, "stride": stride, "windows": len(spans), "environment": environment(device),
            "results": results}


def format_perplexity(payload: dict) -> str:
    from .common import delta

    first = payload["results"][0]
    lines = [f"model: {payload['model']}  windows: {payload['windows']} × {payload['seq_len']} tokens "
             f"(stride {payload['stride']})", "",
             "| attention | perplexity | bits/token | bits/byte | Δ bits/byte |", "|---|---:|---:|---:|---:|"]
    for r in payload["results"]:
        lines.append(f"| {r['attn']} | {r['perplexity']:.4f} | {r['bits_per_token']:.4f} | {r['bits_per_byte']:.4f} "
                     f"| {delta(r['bits_per_byte'], first['bits_per_byte'])} |")
    return "\n".join(lines)
