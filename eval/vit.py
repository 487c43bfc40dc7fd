"""Image-classification accuracy (top-1, top-5) and throughput for several attention settings at once.

Datasets (``SPEC``): a parquet file with image and label columns (Hugging Face datasets format), an image-folder
directory (one sub-folder per class), or a hub dataset ``NAME[:SPLIT]`` (default split ``validation``).
Models: a Transformers image classifier (hub id or path; ViT, DeiT, ...) or ``timm:NAME`` (a timm model with
pretrained weights, routed through :mod:`hf_distrattn.patches.timm_vit`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..settings import apply_setting, check_model, parse_settings, pick_device, pick_dtype
from .common import EvalError, environment


def load_images(spec: str, limit: int | None, image_column: str, label_column: str):
    """The first ``limit`` rows of the dataset ``spec``, checked for its image and label columns."""
    import datasets

    path = Path(spec)
    try:
        if spec.endswith(".parquet"):
            if not path.is_file():
                raise EvalError(f"dataset file not found: {spec}")
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif path.is_dir():
            rows = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        else:
            name, _, split = spec.partition(":")
            rows = datasets.load_dataset(name, split=split or "validation")
    except EvalError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many types for "cannot get it"
        raise EvalError(f"cannot load dataset {spec!r}: {str(error).splitlines()[0]}") from None
    for column in (image_column, label_column):
        if column not in rows.column_names:
            raise EvalError(f"dataset {spec!r} has no column {column!r} (columns: {rows.column_names})")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return rows


class Classifier:
    """A model and its preprocessing: ``pixels(images)`` and ``logits(pixels)``; ``use(name, config)``."""

    def __init__(self, model: str, device: str, dtype: torch.dtype):
        self.device, self.dtype, self.timm = device, dtype, model.startswith("timm:")
        if self.timm:
            try:
                import timm
            except Exception as error:  # noqa: BLE001 - a torchvision built for another torch fails oddly
                raise EvalError(f"timm models need timm (pip install 'hf-distrattn[timm]'): {error}") from None
            self.model = timm.create_model(model.removeprefix("timm:"), pretrained=True)
            data_config = timm.data.resolve_data_config({}, model=self.model)
            self.transform = timm.data.create_transform(**data_config)
        else:
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            check_model(model)
            try:
                self.model = AutoModelForImageClassification.from_pretrained(model)
                self.processor = AutoImageProcessor.from_pretrained(model)
            except OSError as error:
                raise EvalError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
        self.model = self.model.to(device, dtype).eval()

    def pixels(self, images) -> torch.Tensor:
        images = [im.convert("RGB") for im in images]
        if self.timm:
            return torch.stack([self.transform(im) for im in images])
        return self.processor(images, return_tensors="pt")["pixel_values"]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        out = self.model(pixels) if self.timm else self.model(pixel_values=pixels).logits
        return out.float()

    def use(self, name: str, config) -> None:
        if not self.timm:
            apply_setting(self.model, name, config)
            return
        from ..patches import timm_vit

        timm_vit.revert(self.model)
        if name == "distr":
            timm_vit.apply(self.model, config)
        elif name != "sdpa":
            raise EvalError(f"timm models take 'sdpa' or 'distr' settings, not {name!r}")


@torch.no_grad()
def run_vit(model: str, dataset: str, specs: list[str], limit: int | None = None, batch_size: int = 64,
            image_column: str = "image", label_column: str = "label", device: str | None = None,
            dtype: str = "auto") -> dict:
    from tqdm.auto import tqdm

    settings = parse_settings(specs)
    rows = load_images(dataset, limit, image_column, label_column)
    device = pick_device(device)
    classifier = Classifier(model, device, pick_dtype(dtype, device))
    labels = torch.tensor(rows[label_column])
    batches = [classifier.pixels(rows[i : i + batch_size][image_column]) for i in range(0, len(rows), batch_size)]
    results = []
    for spec, name, config in settings:
        classifier.use(name, config)
        logits, seconds = [], 0.0
        for pixels in tqdm(batches, desc=spec, unit="batch", leave=False):
            start = time.perf_counter()
            logits.append(classifier.logits(pixels).cpu())
            seconds += time.perf_counter() - start
        logits = torch.cat(logits)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        results.append({"attn": spec, "top1": (top5[:, 0] == labels).float().mean().item(),
                        "top5": (top5 == labels[:, None]).any(-1).float().mean().item(),
                        "images_per_s": len(labels) / seconds, "images": len(labels)})
    return {"task": "image-classification", "model": model, "dataset": dataset, "images": len(labels),
            "environment": environment(device), "results": results}


def format_vit(payload: dict) -> str:
    first = payload["results"][0]
    lines = [f"model: {payload['model']}  dataset: {payload['dataset']}  images: {payload['images']}", "",
             "| attention | top-1 | top-5 | Δ top-1 (points) | images/s |", "|---|---:|---:|---:|---:|"]
    for r in payload["results"]:
        lines.append(f"| {r['attn']} | {100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | "
                     f"{100 * (r['top1'] - first['top1']):+.2f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)
