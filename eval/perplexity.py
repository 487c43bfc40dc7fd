"""Perplexity of a causal LM over fixed windows of a token stream, for several attention settings at once.

Windows are ``seq_len`` tokens starting every ``stride`` tokens; with ``stride < seq_len`` only the last
``stride`` tokens of each later window are scored (the usual HF sliding-window protocol), so every scored token
is counted once. Loss is the mean negative log-likelihood in nats per scored token.
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
