"""What every eval shares: devices and dtypes, attention settings on a model, the environment record, output."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch


class EvalError(ValueError):
    """A bad argument or input of an eval: the CLI prints it as one line."""


def environment(device: str | None = None) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": device or "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def cuda_ms(fn, reps: int, warmup: int = 1, before=None) -> float:
    """Median CUDA-event time of ``fn`` in ms after ``warmup`` calls; ``before()`` runs ahead of each timed call."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def write_results(json_path: str | None, markdown_path: str | None, header: str, rows: list, table: str,
                  **extra) -> None:
    """A benchmark's rows as JSON (with the environment) and its table as Markdown under a one-line header."""
    env = environment("cuda") | extra | {"command": command()}
    write_json(json_path, {"environment": env, "rows": rows})
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(f"{stamp(env)}, {header}: `{env['command']}`\n\n{table}\n")
    print(table)


def command() -> str:
    """The command line that ran this process, as a user would type it (``python -m hf_distrattn.eval.X ...``)."""
    module = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"python -m {module.name.removesuffix('.__main__')}" if module is not None else Path(sys.argv[0]).name
    return " ".join([program, *(shlex.quote(arg) for arg in sys.argv[1:])])


def stamp(env: dict) -> str:
    """One line naming where and when a table was made: GPU, torch / triton / transformers versions, date (UTC)."""
    return (f"{env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
            f"{env['date']}")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def delta(value: float, reference: float) -> str:
    return "—" if reference == 0 else f"{100 * (value - reference) / reference:+.2f}%"
