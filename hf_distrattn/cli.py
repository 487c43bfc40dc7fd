"""The ``hf-distrattn`` command line (``python -m hf_distrattn`` is the same)."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> None:
    from .demo import format_table, run_demo

    result = run_demo(model=args.model, attn=args.attn, prompt=args.prompt, new_tokens=args.new_tokens,
                      device=args.device, dtype=args.dtype)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _paths(args) -> None:
    from .demo import load_config, load_model
    from .eval.common import apply_setting, parse_settings, pick_device, pick_dtype
    from .integration import layer_plans

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, _ = load_model(args.model, load_config(), device, dtype)
    (spec, name, config), = parse_settings([args.attn or "distr"])
    apply_setting(model, name, config)
    rows = layer_plans(model, args.seq_len, needs_grad=args.training)
    print(f"{spec} on {device} ({dtype}), a {'training ' if args.training else ''}prefill of {args.seq_len} "
          "tokens and a one-token decode step after it")
    print("| layer | G | prefill | why | decode | why |\n|---:|---:|---|---|---|---|")
    for row in rows:
        print(f"| {row['layer']} | {row['config'].group_size} | {row['prefill']} | {row['prefill_reason']} | "
              f"{row.get('decode', '—')} | {row.get('decode_reason', '')} |")


def _ppl(args) -> None:
    from .eval.common import write_json
    from .eval.perplexity import format_perplexity, run_perplexity

    payload = run_perplexity(args.model, args.attn or ["sdpa", "distr"], text_file=args.text_file,
                             dataset=args.dataset, split=args.split, seq_len=args.seq_len, stride=args.stride,
                             max_windows=args.max_windows, device=args.device, dtype=args.dtype)
    print(format_perplexity(payload))
    write_json(args.json, payload)


def _vit(args) -> None:
    from .eval.common import write_json
    from .eval.vit import format_vit, run_vit

    payload = run_vit(args.model, args.dataset, args.attn or ["sdpa", "distr"], limit=args.limit,
                      batch_size=args.batch_size, image_column=args.image_column, label_column=args.label_column,
                      device=args.device, dtype=args.dtype)
    print(format_vit(payload))
    write_json(args.json, payload)


def _tables(args) -> None:
    from .eval.tables import run_tables

    run_tables(args.config, args.out, device=args.device, dtype=args.dtype)
    print(open(f"{args.out}/tables.md").read())
    print(f"wrote {args.out}/tables.md, results.json and PNG plots")


def _bench(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("the benchmark needs a CUDA GPU")
    from .eval import activation_error, bench_decode, bench_e2e, bench_kernels

    bench_kernels.main(["--json", f"{args.out}/kernels.json", "--markdown", f"{args.out}/kernels.md"])
    bench_decode.main(["--json", f"{args.out}/decode.json", "--markdown", f"{args.out}/decode.md"])
    bench_e2e.main(["--json", f"{args.out}/e2e.json", "--markdown", f"{args.out}/e2e.md"])
    captured = [(flag, value) for flag, value in (("--lm", args.lm), ("--text-file", args.text_file),
                                                  ("--vit", args.vit), ("--dataset", args.dataset)) if value]
    if captured:
        activation_error.main([x for pair in captured for x in pair] + [
            "--json", f"{args.out}/activation_error.json", "--markdown", f"{args.out}/activation_error.md"])


def _finetune(args) -> None:
    import dataclasses

    import yaml

    from .finetune import FinetuneArgs, finetune, format_history

    values = {}
    if args.config:
        try:
            values = yaml.safe_load(open(args.config)) or {}
        except FileNotFoundError:
            raise ValueError(f"config file not found: {args.config}") from None
        unknown = set(values) - {f.name for f in dataclasses.fields(FinetuneArgs)}
        if unknown:
            raise ValueError(f"{args.config}: unknown key(s) {sorted(unknown)}")
    values |= {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneArgs)
               if getattr(args, f.name) is not None}
    for required in ("model", "output_dir"):
        if required not in values:
            raise ValueError(f"--{required.replace('_', '-')} is required (on the command line or in --config)")
    print(format_history(finetune(FinetuneArgs(**values))))


def _finetune_parser(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`FinetuneArgs` field; unset flags (``None``) leave the YAML or default value."""
    import dataclasses

    from .finetune import FinetuneArgs

    parser.add_argument("--config", help="YAML of these settings (flags override it), e.g. configs/finetune-*.yaml")
    for f in dataclasses.fields(FinetuneArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None)
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        parser.add_argument(flag, type=kind, default=None)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attn", action="append",
                        help="attention setting, repeatable (the first is the reference): sdpa, distr:group_size=2")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="write the results (with the environment) here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-distrattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate with sdpa and distr side by side")
    demo.add_argument("--model", help="hub id or local path of a causal LM (default: bundled random Llama)")
    demo.add_argument("--prompt")
    demo.add_argument("--new-tokens", type=int)
    _common(demo)
    demo.set_defaults(run=_demo)

    paths = commands.add_parser("paths", help="which implementation each attention layer runs, and why")
    paths.add_argument("--model", help="hub id or local path (default: the demo's bundled random Llama)")
    paths.add_argument("--attn", help="one attention setting, e.g. distr:group_size=2,sampled=k (default: distr)")
    paths.add_argument("--seq-len", type=int, default=4096)
    paths.add_argument("--training", action="store_true", help="with gradients (the training path)")
    paths.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    paths.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    paths.set_defaults(run=_paths)

    ppl = commands.add_parser("ppl", help="perplexity and bits per byte of a causal LM")
    ppl.add_argument("--model", required=True, help="hub id or local path")
    ppl.add_argument("--text-file", help="a local text file")
    ppl.add_argument("--dataset", help="a datasets name, NAME[:CONFIG], e.g. wikitext:wikitext-2-raw-v1")
    ppl.add_argument("--split", default="test")
    ppl.add_argument("--seq-len", type=int, default=2048)
    ppl.add_argument("--stride", type=int, help="window stride (default: seq-len, no overlap)")
    ppl.add_argument("--max-windows", type=int)
    _common(ppl)
    ppl.set_defaults(run=_ppl)

    vit = commands.add_parser("vit", help="top-1/top-5 accuracy and images/s of an image classifier")
    vit.add_argument("--model", required=True, help="hub id, local path, or timm:NAME")
    vit.add_argument("--dataset", required=True, help="parquet file, image folder, or hub NAME[:SPLIT]")
    vit.add_argument("--limit", type=int, help="first K images")
    vit.add_argument("--batch-size", type=int, default=64)
    vit.add_argument("--image-column", default="image")
    vit.add_argument("--label-column", default="label")
    _common(vit)
    vit.set_defaults(run=_vit)

    tables = commands.add_parser("tables", help="a YAML grid of models × settings: Markdown tables and PNG plots")
    tables.add_argument("config", help="a YAML file, e.g. configs/shared-models.yaml")
    tables.add_argument("--out", default="results/tables")
    tables.add_argument("--device")
    tables.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    tables.set_defaults(run=_tables)

    finetune = commands.add_parser("finetune", help="fine-tune a causal LM or image classifier through distr")
    _finetune_parser(finetune)
    finetune.set_defaults(run=_finetune)

    bench = commands.add_parser("bench", help="kernel and end-to-end latency against SDPA and sageattention (GPU)")
    bench.add_argument("--out", default="results")
    bench.add_argument("--lm", help="also: attention error on q/k/v captured from this causal LM ...")
    bench.add_argument("--text-file", help="... on the first window of this text")
    bench.add_argument("--vit", help="also: attention error on q/k/v captured from this image classifier ...")
    bench.add_argument("--dataset", help="... on the first images of this dataset")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"hf-distrattn {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
