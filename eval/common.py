"""What every eval shares: devices and dtypes, attention settings on a model, the environment record, output."""

from __future__ import annotations

import json
import platform

import torch

from ..config import parse_attn_spec
from ..integration import configure


class EvalError(ValueError):
    """A bad argument or input of an eval: the CLI prints it as one line."""


def pick_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def parse_settings(specs: list[str]) -> list[tuple[str, str, object]]:
    """``(spec, implementation, DistrConfig | None)`` for each ``--attn``; a bad one raises EvalError."""
    out = []
    for spec in specs:
        try:
            name, config = parse_attn_spec(spec)
        except ValueError as error:
            raise EvalError(f"unknown attention setting {spec!r}: {error}") from None
        out.append((spec, name, config))
    return out


def apply_setting(model, name: str, config) -> None:
    """Switch ``model`` to attention ``name`` (and, for distr, ``config`` in every layer)."""
    try:
        model.set_attn_implementation(name)
    except (KeyError, ValueError) as error:
        raise EvalError(f"attention implementation {name!r} is not available: {error}") from None
    if config is not None:
        configure(model, config)


def environment(device: str | None = None) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": device or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def delta(value: float, reference: float) -> str:
    return "—" if reference == 0 else f"{100 * (value - reference) / reference:+.2f}%"
