"""``hf-distrattn tables CONFIG.yaml``: a grid of models × attention settings, as Markdown tables and PNG plots.

The YAML file (see ``configs/``) holds ``attn`` (the settings; the first is the reference), ``lm`` entries
(``model``, ``text_file`` or ``dataset``, ``seq_len``, ``stride``, ``max_windows``, optional ``latency_seq_lens``)
and ``image`` entries (``model``, ``dataset``, ``limit``, ``batch_size``, columns). Writes ``results.json``,
``tables.md``, ``accuracy_vs_G.png`` and, where latencies were asked for, ``latency_vs_seq_len.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from ..config import parse_attn_spec
from ..settings import apply_setting, pick_device, pick_dtype
from .common import EvalError, environment
from .perplexity import format_perplexity, run_perplexity
from .vit import format_vit, run_vit


def load_grid(path: str) -> dict:
    if not Path(path).is_file():
        raise EvalError(f"grid config not found: {path}")
    grid = yaml.safe_load(Path(path).read_text())
    if not isinstance(grid, dict) or not grid.get("attn") or not (grid.get("lm") or grid.get("image")):
        raise EvalError(f"{path}: needs 'attn' and at least one 'lm' or 'image' entry")
    return grid


@torch.no_grad()
def lm_latency(model: str, specs: list[str], seq_lens: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    """Forward latency (ms, median of 3 after a warm-up) of one sequence per length and setting."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    rows = []
    for spec in specs:
        apply_setting(lm, *parse_attn_spec(spec))
        for n in seq_lens:
            ids = torch.randint(0, lm.config.vocab_size, (1, n), device=device)
            times = []
            for _ in range(4):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                lm(ids, use_cache=False, logits_to_keep=1)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - start))
            rows.append({"attn": spec, "seq_len": n, "ms": sorted(times[1:])[1]})
    return rows


def series_key(spec: str) -> tuple[str, int]:
    """``(label of the variant without G, G)``: settings that differ only in G form one line of a plot."""
    name, config = parse_attn_spec(spec)
    if config is None:
        return name, 1
    if config.grouping == "truncate":
        label = "truncate"
    elif config.grouping in ("pca", "subspace"):  # no column groups, nothing to reduce
        label = f"{config.grouping}, block {config.block_size}"
    else:
        label = f"{config.grouping}, {config.reduce}, block {config.block_size}"
    if config.sampled == "k" and config.grouping != "subspace":
        label += ", keys sampled"
    if config.exact_layers:
        label += f", exact layers {'+'.join(map(str, config.exact_layers))}"
    return ("exact" if config.group_size == 1 else label), config.group_size


def panel_title(payload: dict) -> str:
    """The model's folder name (its parent's where it is a generic ``model``) and the data it was scored on."""
    model = Path(payload["model"])
    name = model.parent.name if model.name == "model" else model.name
    data = payload.get("text_file") or payload.get("dataset")
    return f"{name} · {Path(data).name}" if data else name


def plot_accuracy(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, payload in zip(axes[0], results, strict=True):
        metric = "bits_per_byte" if payload["task"] == "perplexity" else "top1"
        exact = payload["results"][0][metric]
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in payload["results"]:
            label, group = series_key(r["attn"])
            if group > 1:
                lines.setdefault(label, []).append((group, r[metric]))
        for label, points in lines.items():
            points.sort()
            ax.plot([g for g, _ in points], [m for _, m in points], marker="o", label=label)
        ax.axhline(exact, color="black", linestyle="--", label=f"{payload['results'][0]['attn']} (reference)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size G")
        ax.set_ylabel("held-out bits/byte (lower is better)" if metric == "bits_per_byte" else "top-1")
        ax.set_title(panel_title(payload), fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in dict.fromkeys(r["attn"] for r in rows):
        points = [(r["seq_len"], r["ms"]) for r in rows if r["attn"] == spec]
        ax.plot([n for n, _ in points], [ms for _, ms in points], marker="o", label=spec)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward latency (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out_dir: str) -> None:
    """Draw the plots of ``out_dir/results.json`` again (no evaluation)."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise EvalError(f"no results to plot: {path} not found (run the grid first)")
    summary = json.loads(path.read_text())
    plot_accuracy(summary["results"], Path(out_dir) / "accuracy_vs_G.png")
    if summary.get("latency"):
        plot_latency(summary["latency"], Path(out_dir) / "latency_vs_seq_len.png")


def run_tables(config_path: str, out_dir: str, device: str | None = None, dtype: str = "auto") -> dict:
    grid = load_grid(config_path)
    specs = grid["attn"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    results, latency, sections = [], [], [f"# {grid.get('title', Path(config_path).stem)}", ""]
    for entry in grid.get("lm") or []:
        payload = run_perplexity(entry["model"], specs, text_file=entry.get("text_file"),
                                 dataset=entry.get("dataset"), split=entry.get("split", "test"),
                                 seq_len=entry.get("seq_len", 2048), stride=entry.get("stride"),
                                 max_windows=entry.get("max_windows"), device=device, dtype=dtype)
        results.append(payload)
        sections += [format_perplexity(payload), ""]
        if entry.get("latency_seq_lens"):
            latency += [r | {"model": entry["model"]} for r in
                        lm_latency(entry["model"], specs, entry["latency_seq_lens"], device, pick_dtype(dtype, device))]
    for entry in grid.get("image") or []:
        payload = run_vit(entry["model"], entry["dataset"], specs, limit=entry.get("limit"),
                          batch_size=entry.get("batch_size", 64), image_column=entry.get("image_column", "image"),
                          label_column=entry.get("label_column", "label"), device=device, dtype=dtype)
        results.append(payload)
        sections += [format_vit(payload), ""]
    plot_accuracy(results, out / "accuracy_vs_G.png")
    if latency:
        plot_latency(latency, out / "latency_vs_seq_len.png")
        sections += ["| model | attention | seq len | forward ms |", "|---|---|---:|---:|"]
        sections += [f"| {Path(r['model']).name} | {r['attn']} | {r['seq_len']} | {r['ms']:.1f} |" for r in latency]
    summary = {"config": grid, "environment": environment(device), "results": results, "latency": latency}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "tables.md").write_text("\n".join(sections) + "\n")
    return summary
