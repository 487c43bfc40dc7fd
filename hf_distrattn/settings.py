"""Attention settings on a model, and where to run it: what the CLI's commands share.

A setting is Transformers' name of an attention implementation, or ``distr`` with ``key=value`` fields
(:func:`hf_distrattn.config.parse_attn_spec`), as the CLI's ``--attn`` and the YAML configs write it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import parse_attn_spec
from .integration import configure


def pick_device(device: str | None) -> str:
    """``device``, or ``"cuda"`` where a GPU is available, else ``"cpu"``; a CUDA device with no GPU is an error."""
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available to this torch ({torch.__version__})")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_model(name: str) -> None:
    """``name`` must be an existing local folder or a hub id (``org/name``): a path that does not exist is an error
    here, not a hub lookup's "Repo id must be in the form ..."."""
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"model not found: {name} is not a local folder (a hub id has the form 'org/name')")


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def parse_settings(specs: list[str]) -> list[tuple[str, str, object]]:
    """``(spec, implementation, DistrConfig | None)`` for each ``--attn``; a bad one raises a ValueError."""
    out = []
    for spec in specs:
        try:
            name, config = parse_attn_spec(spec)
        except ValueError as error:
            raise ValueError(f"unknown attention setting {spec!r}: {error}") from None
        out.append((spec, name, config))
    return out


def apply_setting(model, name: str, config) -> None:
    """Switch ``model`` to attention ``name`` (and, for distr, ``config`` in every layer)."""
    try:
        model.set_attn_implementation(name)
    except (KeyError, ValueError, ImportError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ValueError(f"attention implementation {name!r} is not available: {reason}") from None
    if config is not None:
        configure(model, config)
