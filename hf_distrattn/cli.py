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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-distrattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate with sdpa and distr side by side")
    demo.add_argument("--model", help="hub id or local path of a causal LM (default: bundled random Llama)")
    demo.add_argument("--attn", action="append", help="attention setting, repeatable: sdpa, distr:group_size=2")
    demo.add_argument("--prompt")
    demo.add_argument("--new-tokens", type=int)
    demo.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    demo.add_argument("--json", help="also write the results here")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"hf-distrattn {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
