"""Training data for the recovery fine-tuning of the shared models, from Debian packages (no network).

- Fashion-MNIST training split: ``dataset-fashion-mnist`` ships the original IDX files
  (``/usr/share/datasets/fashion-mnist/train-*-idx*-ubyte.gz``); written as a parquet file in the Hugging Face
  datasets image format (``image`` = PNG bytes, ``label``), like ``fashion-mnist-test.parquet``.
- King James text other than the held-out part: ``bible-kjv`` dumps every verse with
  ``bible -f "Gen1:1-Rev22:21"`` (one ``Ref text`` line per verse). The verse references are stripped and the
  text is cut where the held-out file begins, so no held-out verse is trained on.

    apt-get download dataset-fashion-mnist bible-kjv bible-kjv-text   # or take them from /var/cache/apt
    python -m hf_distrattn.eval.prepare_training_data --fashion-mnist-dir DIR --kjv-verses verses.txt \\
        --heldout ../shared/data/heldout_kjv.txt --out data/
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import struct
from pathlib import Path

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path):
    """An IDX file (optionally gzipped) as a uint8 numpy array of its declared shape."""
    import numpy as np

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_parquet(directory: Path, split: str, out: Path) -> int:
    """Write ``split`` (``train`` or ``t10k``) as parquet with PNG images; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    images = read_idx(directory / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        pngs.append({"bytes": buffer.getvalue(), "path": None})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    schema = pa.schema([("image", image_type), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(pa.table({"image": pngs, "label": labels.astype("int64")}, schema=schema), out)
    return len(labels)


def kjv_training_text(verses: str, heldout: str) -> str:
    """The verses (``Ref text`` lines) before the held-out file's first line, references stripped."""
    lines = [re.sub(r"^\S+\d+:\d+ ", "", line) for line in verses.splitlines() if line.strip()]
    first = heldout.splitlines()[0].strip()
    if first not in lines:
        raise ValueError("the held-out text's first verse is not in the verse dump")
    return "\n".join(lines[: lines.index(first)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist-dir", type=Path, help="folder with the IDX .gz files")
    parser.add_argument("--kjv-verses", type=Path, help='output of bible -f "Gen1:1-Rev22:21"')
    parser.add_argument("--heldout", type=Path, help="heldout_kjv.txt (the text to leave out)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fashion_mnist_dir:
        rows = fashion_mnist_parquet(args.fashion_mnist_dir, "train", args.out / "fashion-mnist-train.parquet")
        print(f"fashion-mnist-train.parquet: {rows} images")
    if args.kjv_verses:
        if not args.heldout:
            parser.error("--kjv-verses needs --heldout")
        text = kjv_training_text(args.kjv_verses.read_text(), args.heldout.read_text())
        (args.out / "kjv_train.txt").write_text(text)
        print(f"kjv_train.txt: {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
