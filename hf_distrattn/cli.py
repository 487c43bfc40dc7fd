"""The ``hf-distrattn`` command line (``python -m hf_distrattn`` is the same).

Only the chosen command's arguments and modules are loaded, so ``hf-distrattn --help`` imports neither torch nor
Transformers. Every error is one line on stderr, ``hf-distrattn COMMAND: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ["auto", "float32", "bfloat16", "float16"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device_and_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attn", action="append",
                        help="attention setting, repeatable (the first is the reference): sdpa, distr:group_size=2")
    _device_and_dtype(parser)
    parser.add_argument("--json", help="write the results (with the environment) here")


def _demo(args) -> None:
    from .demo import format_table, run_demo

    result = run_demo(model=args.model, attn=args.attn, prompt=args.prompt, new_tokens=args.new_tokens,
                      device=args.device, dtype=args.dtype)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _demo_parser(parser) -> None:
    parser.add_argument("--model", help="hub id or local path of a causal LM (default: bundled random Llama)")
    parser.add_argument("--prompt")
    parser.add_argument("--new-tokens", type=positive)
    _common(parser)


def _paths(args) -> None:
    from .demo import load_config, load_model
    from .integration import layer_plans
    from .settings import apply_setting, parse_settings, pick_device, pick_dtype

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


def _paths_parser(parser) -> None:
    parser.add_argument("--model", help="hub id or local path (default: the demo's bundled random Llama)")
    parser.add_argument("--attn", help="one attention setting, e.g. distr:group_size=2,sampled=k (default: distr)")
    parser.add_argument("--seq-len", type=positive, default=4096)
    parser.add_argument("--training", action="store_true", help="with gradients (the training path)")
    _device_and_dtype(parser)


def _ppl(args) -> None:
    from .eval.common import write_json
    from .eval.perplexity import format_perplexity, run_perplexity

    payload = run_perplexity(args.model, args.attn or ["sdpa", "distr"], text_file=args.text_file,
                             dataset=args.dataset, split=args.split, seq_len=args.seq_len, stride=args.stride,
                             max_windows=args.max_windows, device=args.device, dtype=args.dtype)
    print(format_perplexity(payload))
    write_json(args.json, payload)


def _ppl_parser(parser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local path")
    parser.add_argument("--text-file", help="a local text file")
    parser.add_argument("--dataset", help="a datasets name, NAME[:CONFIG], e.g. wikitext:wikitext-2-raw-v1")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seq-len", type=positive, default=2048)
    parser.add_argument("--stride", type=positive, help="window stride (default: seq-len, no overlap)")
    parser.add_argument("--max-windows", type=positive)
    _common(parser)


def _vit(args) -> None:
    from .eval.common import write_json
    from .eval.vit import format_vit, run_vit

    payload = run_vit(args.model, args.dataset, args.attn or ["sdpa", "distr"], limit=args.limit,
                      batch_size=args.batch_size, image_column=args.image_column, label_column=args.label_column,
                      device=args.device, dtype=args.dtype)
    print(format_vit(payload))
    write_json(args.json, payload)


def _vit_parser(parser) -> None:
    parser.add_argument("--model", required=True, help="hub id, local path, or timm:NAME")
    parser.add_argument("--dataset", required=True, help="parquet file, image folder, or hub NAME[:SPLIT]")
    parser.add_argument("--limit", type=positive, help="first K images")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    _common(parser)


def _tables(args) -> None:
    from .eval.tables import replot, run_tables

    if args.replot:
        replot(args.out)
        print(f"redrew the plots of {args.out}/results.json")
        return
    run_tables(args.config, args.out, device=args.device, dtype=args.dtype)
    print(open(f"{args.out}/tables.md").read())
    print(f"wrote {args.out}/tables.md, results.json and PNG plots")


def _tables_parser(parser) -> None:
    parser.add_argument("config", help="a YAML file, e.g. configs/shared-models.yaml")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots of OUT/results.json")
    _device_and_dtype(parser)


def _calibrate(args) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration import calibrate
    from .settings import check_model, parse_settings, pick_device, pick_dtype

    (_, name, config), = parse_settings([args.attn])
    if name != "distr":
        raise ValueError(f"--attn must be a distr setting, got {args.attn!r}")
    text = open(args.text_file, encoding="utf-8", errors="replace").read() if args.text_file else None
    if not text or not text.strip():
        raise ValueError(f"--text-file: no text in {args.text_file!r}")
    device = pick_device(args.device)
    check_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=pick_dtype(args.dtype, device),
                                                 attn_implementation="distr").to(device).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(text, add_special_tokens=False).input_ids)
    cal = calibrate(model, ids, budget=args.budget, config=config, seq_len=args.seq_len,
                    max_windows=args.max_windows, progress=lambda layers: tqdm(layers, desc="layers", unit="layer"))
    print("| layer | sensitivity | G |\n|---:|---:|---:|")
    for layer, (sensitivity, chosen) in enumerate(zip(cal.sensitivity, cal.configs, strict=True)):
        print(f"| {layer} | {sensitivity:+.2%} | {chosen.group_size} |")
    print(f"\nloss {cal.loss_increase:+.2%} against exact (budget {args.budget:.0%}), attention FLOPs saved "
          f"{cal.attention_flops_saved:.1%}\nsetting: {cal.spec}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": cal.spec, "exact_loss": cal.exact_loss, "loss": cal.loss,
                       "loss_increase": cal.loss_increase, "attention_flops_saved": cal.attention_flops_saved,
                       "sensitivity": cal.sensitivity}, f, indent=2)


def _calibrate_parser(parser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local path of a causal LM")
    parser.add_argument("--text-file", required=True, help="calibration text (keep it apart from the eval text)")
    parser.add_argument("--budget", type=float, default=0.02, help="relative loss increase allowed (0.02 = 2%%)")
    parser.add_argument("--attn", default="distr:group_size=2", help="the setting of an approximated layer")
    parser.add_argument("--seq-len", type=positive, default=1024)
    parser.add_argument("--max-windows", type=positive, default=2)
    _device_and_dtype(parser)
    parser.add_argument("--json", help="write the result here")


def _bench(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("the benchmark needs a CUDA GPU")
    from .eval import activation_error, bench_decode, bench_e2e, bench_kernels

    bench_kernels.main(["--json", f"{args.out}/kernels.json", "--markdown", f"{args.out}/kernels.md",
                        "--plot", f"{args.out}/speed_vs_seq_len.png"])
    bench_decode.main(["--json", f"{args.out}/decode.json", "--markdown", f"{args.out}/decode.md"])
    bench_e2e.main(["--compile", "--json", f"{args.out}/e2e.json", "--markdown", f"{args.out}/e2e.md"])
    captured = [(flag, value) for flag, value in (("--lm", args.lm), ("--text-file", args.text_file),
                                                  ("--vit", args.vit), ("--dataset", args.dataset)) if value]
    if captured:
        activation_error.main([x for pair in captured for x in pair] + [
            "--json", f"{args.out}/activation_error.json", "--markdown", f"{args.out}/activation_error.md"])


def _bench_parser(parser) -> None:
    parser.add_argument("--out", default="results")
    parser.add_argument("--lm", help="also: attention error on q/k/v captured from this causal LM ...")
    parser.add_argument("--text-file", help="... on the first window of this text")
    parser.add_argument("--vit", help="also: attention error on q/k/v captured from this image classifier ...")
    parser.add_argument("--dataset", help="... on the first images of this dataset")


def _finetune(args) -> None:
    import dataclasses

    import yaml

    from .eval.finetune import FinetuneArgs, finetune, format_history

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


def _finetune_parser(parser) -> None:
    """One flag per :class:`FinetuneArgs` field; unset flags (``None``) leave the YAML or default value."""
    import dataclasses

    from .eval.finetune import FinetuneArgs

    parser.add_argument("--config", help="YAML of these settings (flags override it), e.g. configs/finetune-*.yaml")
    for f in dataclasses.fields(FinetuneArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None)
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        parser.add_argument(flag, type=kind, default=None)


COMMANDS = {  # name: (help, arguments, run)
    "demo": ("generate with sdpa and distr side by side", _demo_parser, _demo),
    "paths": ("which implementation each attention layer runs, and why", _paths_parser, _paths),
    "ppl": ("perplexity and bits per byte of a causal LM", _ppl_parser, _ppl),
    "vit": ("top-1/top-5 accuracy and images/s of an image classifier", _vit_parser, _vit),
    "tables": ("a YAML grid of models × settings: Markdown tables and PNG plots", _tables_parser, _tables),
    "calibrate": ("per-layer settings within a loss budget (hf_distrattn.calibrate)", _calibrate_parser, _calibrate),
    "finetune": ("fine-tune a causal LM or image classifier through distr", _finetune_parser, _finetune),
    "bench": ("kernel and end-to-end latency against SDPA and sageattention (GPU)", _bench_parser, _bench),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` only (the others listed by name and help)."""
    parser = Parser(prog="hf-distrattn", description="DistrAttention and Tree Attention for Hugging Face "
                    "Transformers: demo, evals and benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (help_text, arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        message = str(error).splitlines()[0] if str(error) else repr(error)
        print(f"hf-distrattn {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
