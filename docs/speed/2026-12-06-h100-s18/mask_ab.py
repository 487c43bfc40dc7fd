r"""Decode kernel A/B under a static cache's mask: the repository's ``kernels/decode.py`` against another version of
it, a module beside this file (``--other``), each without and with the mask, beside SDPA without and with it.
CUDA-graph µs of one step (cache update + attention), bf16, 32/8 heads, batch 1 (``DEV=cpu``: a dry run under the
interpreter). Also checks, compiled, that the two kernels agree bit for bit on a random key mask (batch 2).

Eighteenth session (``mask_ab.log``): the repository was commit 57986b8 (``MASK_ROW``: the mask read as one shared
row a tile) and ``--other decode_old`` was ebf43e4's kernel (a 16-row tile; today's). Next: ``--other
decode_prefetch`` (the mask loaded a tile ahead) and ``--other decode_rowprefetch`` (a shared mask row loaded a
tile ahead), each made from today's kernel with absolute imports and its patch:

    git show HEAD:hf_distrattn/kernels/decode.py | sed 's/^from \.launch/from hf_distrattn.kernels.launch/;
        s/^from \.softmax/from hf_distrattn.kernels.softmax/' > decode_prefetch.py
    cp decode_prefetch.py decode_rowprefetch.py
    patch decode_prefetch.py < decode_prefetch.patch && patch decode_rowprefetch.py < decode_rowprefetch.patch
"""
import argparse
import importlib
import json
import os
import sys

import torch

from hf_distrattn.config import DistrConfig
from hf_distrattn.eval.bench_decode import _sdpa, _step, graph_us
from hf_distrattn.kernels import decode as ours

DEV = os.environ.get("DEV", "cuda")
if DEV == "cpu":
    def graph_us(fn):  # noqa: F811 - the dry run times nothing
        fn()
        return 0.0

parser = argparse.ArgumentParser()
parser.add_argument("lens", type=int, nargs="*", default=[32832, 131136, 4160])
parser.add_argument("--other", default="decode_prefetch")
args = parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
other = importlib.import_module(args.other)
rows = []
for d in (64, 128):
    for n in args.lens:
        g = torch.Generator(device=DEV).manual_seed(n + d)
        q = torch.randn(1, 32, 1, d, device=DEV, generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, n, d, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(2))
        keep = torch.ones(1, 1, 1, n, dtype=torch.bool, device=DEV)
        rand_keep = torch.rand(2, 1, 1, n, device=DEV, generator=g) > 0.3
        settings = {"G1": DistrConfig(group_size=1, backend="triton")}
        for group in (2, 4):
            settings[f"G{group}-k"] = DistrConfig(group_size=group, block_size=64, grouping="lsh", sampled="k",
                                                  backend="triton")
        row = {"d": d, "n": n}
        for tag, mask in (("", None), ("+mask", keep)):
            attend = _sdpa(q, k, v, None, mask)
            row["sdpa" + tag] = graph_us(_step(q, k, v, None, lambda q, a, b, _, f=attend: f(q, a, b))[0])
        for name, cfg in settings.items():
            for tag, mod, mask in (("", ours, None), ("+mask", ours, keep), (f" {args.other}", other, None),
                                   (f" {args.other}+mask", other, keep)):
                def att(q, a, b, layer, mod=mod, mask=mask, cfg=cfg):
                    red = None if cfg.group_size == 1 else (*layer.reduced, 64)
                    return mod.decode_attention(q, a, b, causal=True, attn_mask=mask, reduced=red)[0]
                row[name + tag] = graph_us(_step(q, k, v, cfg, att)[0])
            if n == args.lens[0]:
                q2, k2, v2 = (t.expand(2, -1, -1, -1).contiguous() for t in (q, k, v))
                _, _, layer2 = _step(q2, k2, v2, cfg, lambda *a: None)
                red = None if cfg.group_size == 1 else (*layer2.reduced, 64)
                a = ours.decode_attention(q2, layer2.keys, layer2.values, attn_mask=rand_keep, reduced=red)
                b = other.decode_attention(q2, layer2.keys, layer2.values, attn_mask=rand_keep, reduced=red)
                row[name + " same"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), f"mask_ab_{args.other}.json"), "w") as f:
    json.dump(rows, f, indent=1)
names = [k for k in rows[0] if k not in ("d", "n") and not k.endswith("same")]
print("| d | cached | " + " | ".join(names) + " |")
print("|" + "---|" * (len(names) + 2))
for r in rows:
    print(f"| {r['d']} | {r['n']} | " + " | ".join(f"{r[k]:.1f}" for k in names) + " |")
print("same:", {k: v for r in rows for k, v in r.items() if k.endswith("same")})
