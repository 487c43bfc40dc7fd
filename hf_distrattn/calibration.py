"""Calibrated drop-in: per-layer settings that keep a model within a loss budget.

Layers differ in how much the approximation costs them (on LMs the first layers most). :func:`calibrate`
measures each layer's *sensitivity* on calibration text, ``s_l = L_l / L_0 − 1`` with ``L_0`` the exact model's mean
next-token loss and ``L_l`` the loss with only layer ``l`` approximated, then approximates the ``k`` least
sensitive layers for the largest ``k`` whose measured loss stays within ``(1 + budget) · L_0`` (a binary search
over ``k``; the loss grows with ``k`` in the sensitivity order, up to the interactions between layers, which
the final measurement includes). A relative change of the mean loss per token is the same relative change of
bits per byte on the same text.

Cost: ``1 + n_layers + ⌈log₂ (n_layers + 1)⌉`` evaluations of the calibration windows. The attention FLOPs a layer
still saves at ``G`` are ``(1 − 1/G) / 2`` of its attention (``Q·Kᵀ`` at ``d/G``, ``P·V`` exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import DistrConfig
from .integration import attention_modules, configure


@dataclass
class Calibration:
    configs: list[DistrConfig]
    """The chosen setting of each attention layer (applied to the model)."""
    exact_loss: float
    """Mean next-token loss (nats) of the exact model on the calibration windows."""
    loss: float
    """The same with the chosen settings."""
    sensitivity: list[float] = field(default_factory=list)
    """Per layer, the relative loss increase with only that layer approximated."""

    @property
    def loss_increase(self) -> float:
        return self.loss / self.exact_loss - 1

    @property
    def spec(self) -> str:
        """The chosen settings as one attention setting (``distr:...,exact_layers=0+3``) for the CLI and configs."""
        approximated = next((c for c in self.configs if not c.exact), self.configs[0])
        exact = [str(i) for i, c in enumerate(self.configs) if c.exact]
        fields = {f: getattr(approximated, f) for f in ("group_size", "block_size", "sampled", "reduce", "grouping")}
        default = DistrConfig()
        text = ",".join(f"{k}={v}" for k, v in fields.items() if v != getattr(default, k) or k == "group_size")
        return f"distr:{text}" + (f",exact_layers={'+'.join(exact)}" if exact else "")

    @property
    def attention_flops_saved(self) -> float:
        """Share of the model's attention FLOPs the chosen settings save."""
        return sum((1 - 1 / c.group_size) / 2 for c in self.configs) / len(self.configs)


def _windows(ids: torch.Tensor, seq_len: int, max_windows: int) -> list[torch.Tensor]:
    out = [ids[start : start + seq_len] for start in range(0, ids.numel() - 1, seq_len)][:max_windows]
    if not out or out[-1].numel() < 2:
        raise ValueError(f"calibration text has {ids.numel()} tokens: too few for one window")
    return out


@torch.no_grad()
def _loss(model, windows: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in windows:
        window = window.to(device)[None]
        logits = model(window).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return total / count


def calibrate(model, texts, budget: float = 0.02, config: DistrConfig | None = None, *, tokenizer=None,
              seq_len: int = 1024, max_windows: int = 2, progress=None) -> Calibration:
    """Choose per-layer settings of ``model`` (``attn_implementation="distr"``) within ``budget`` (relative loss
    increase on ``texts``) and apply them (module notes).

    ``texts``: a string, a list of strings (``tokenizer`` required, or loaded from the model's name or path), or
    a 1-D tensor of token ids. ``config``: the setting of an approximated layer (default ``DistrConfig()``);
    the others are exact. ``progress``: a tqdm-like wrapper of the evaluation loop.
    """
    config = config or DistrConfig()
    if not 0 <= budget:
        raise ValueError(f"budget must be a non-negative relative loss increase, got {budget}")
    if config.exact:
        raise ValueError("config: calibrate chooses where to approximate; give a group_size > 1")
    if model.config._attn_implementation != "distr":
        raise ValueError("calibrate needs the model loaded with attn_implementation='distr' "
                         f"(it has {model.config._attn_implementation!r})")
    if not isinstance(texts, torch.Tensor):
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
        joined = texts if isinstance(texts, str) else "\n\n".join(texts)
        texts = torch.tensor(tokenizer(joined, add_special_tokens=False).input_ids)
    windows = _windows(texts, seq_len, max_windows)
    n_layers = len(attention_modules(model))
    exact = config.replace(group_size=1, exact_layers=())
    config = config.replace(exact_layers=())

    def apply(approximated: set[int]) -> None:
        configure(model, exact)
        if approximated:
            configure(model, config, layers=sorted(approximated))

    def loss_with(approximated: set[int]) -> float:
        apply(approximated)
        return _loss(model, windows)

    steps = range(n_layers)
    exact_loss = loss_with(set())
    sensitivity = [loss_with({layer}) / exact_loss - 1 for layer in (progress(steps) if progress else steps)]
    order = sorted(range(n_layers), key=lambda layer: sensitivity[layer])
    low, high, best = 0, n_layers, (0, exact_loss)  # the largest k within budget
    while low < high:
        k = (low + high + 1) // 2
        loss = loss_with(set(order[:k]))
        if loss <= (1 + budget) * exact_loss:
            low, best = k, (k, loss)
        else:
            high = k - 1
    chosen = set(order[: best[0]])
    apply(chosen)
    return Calibration([config if layer in chosen else exact for layer in range(n_layers)], exact_loss, best[1],
                       sensitivity)
