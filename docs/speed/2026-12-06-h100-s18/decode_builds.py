"""The decode kernel compiled for sm_90 on a CPU (no GPU): registers per thread, SASS instructions, plain ``LDG``
loads and pipelined ``LDGSTS`` copies, for a Llama decode step's launch (16 query rows, 64-key tiles,
``decode.LAUNCH``) with a boolean mask, at d=64/128 and G=1/4 (design.md D18's numbers).

    python docs/speed/2026-12-06-h100-s18/decode_builds.py [MODULE ...] [--unaligned NAME ...]

``MODULE``: ``hf_distrattn.kernels.decode`` (default) or a variant beside this file (``decode_prefetch``,
``decode_rowprefetch``: made as ``mask_ab.py``'s docstring says; ``decode_row``: commit 57986b8's kernel, the same
way). ``--unaligned``: integer arguments not specialized as multiples of 16 (default ``n_k capacity sm_b``: a static
cache whose capacity is not; ``--unaligned`` alone: every integer aligned, as a benchmark's). Without a mask:
``--mask 0``.
"""
import argparse
import importlib
import os
import sys

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.join(here, "..", "..", "..", "tests")]
from test_hopper import _sass  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("modules", nargs="*", default=["hf_distrattn.kernels.decode"])
parser.add_argument("--unaligned", nargs="*", default=["n_k", "capacity", "sm_b"])
parser.add_argument("--mask", type=int, default=1, help="MASK_KIND: 0 none, 1 boolean, 2 additive")
args = parser.parse_args()
launch = importlib.import_module("hf_distrattn.kernels.decode").LAUNCH
for d, group in [(64, 1), (64, 4), (128, 1), (128, 4)]:
    cells = []
    for name in args.modules:
        fn = importlib.import_module(name)._decode_split.fn
        constants = dict(CAUSAL=False, WINDOWED=False, SOFTCAP=False, MASK_KIND=args.mask, IEEE=False, BLOCK_M=16,
                         BLOCK_N=64, D=d, G=min(group, 2), DG=d // group, PDL=False)
        constants |= {flag: args.mask > 0 for flag in ("MASK_ROW",) if flag in fn.arg_names}
        constants |= {flag: False for flag in ("FILLED",) if flag in fn.arg_names}
        types = dict(Grp="*i32", W="*fp32", Part="*fp32", Filled="*i64", scale="fp32", softcap="fp32",
                     Mask="*i1" if args.mask < 2 else "*bf16")
        signature = {n: "constexpr" if n in constants else types.get(n, "*bf16" if n[0].isupper() else "i32")
                     for n in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                   if signature[n] not in ("constexpr", "fp32") and n not in args.unaligned}
        source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, aligned)
        ops, registers = _sass(compile(source, target=GPUTarget("cuda", 90, 32), options=launch))
        copies = sum("LDGSTS" in o for o in ops)
        cells.append(f"{name.rpartition('.')[2]}: {registers} registers, {len(ops)} SASS, "
                     f"{sum('LDG' in o for o in ops) - copies} LDG, {copies} LDGSTS")
    print(f"d={d} G={group}: " + "; ".join(cells), flush=True)
