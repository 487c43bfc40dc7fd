"""Decode kernel A/B: a static cache's key mask read as one shared row (new) or as a 16-row tile (HEAD's kernel),
against no mask and SDPA with the same mask. CUDA-graph µs of one step (cache update + attention), bf16, 32/8
heads, batch 1. Also checks the two paths agree bit for bit on a random key mask, compiled.
As run (eighteenth session): ``hf_distrattn.kernels.decode`` was commit 57986b8's (``MASK_ROW``) and
``decode_old.py`` the repository's kernel of ebf43e4 (today's), imported with absolute imports. To run it again:
``git show ebf43e4:hf_distrattn/kernels/decode.py`` into ``decode_old.py`` beside this file (``from .launch`` /
``from .softmax`` as ``from hf_distrattn.kernels.…``) on a checkout of 57986b8."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import decode_old  # noqa: E402

from hf_distrattn.config import DistrConfig  # noqa: E402
from hf_distrattn.eval.bench_decode import _sdpa, _step, graph_us  # noqa: E402
from hf_distrattn.kernels import decode as decode_new  # noqa: E402

out = os.environ.get("OUT", "/tmp")
DEV = os.environ.get("DEV", "cuda")
if DEV == "cpu":
    def graph_us(fn):
        fn()
        return 0.0
rows = []
lens = [int(x) for x in sys.argv[1:]] or [32832, 131136, 4160]
for d in (64, 128):
    for n in lens:
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
        attend = _sdpa(q, k, v, None, None)
        row["sdpa"] = graph_us(_step(q, k, v, None, lambda q, a, b, _, attend=attend: attend(q, a, b))[0])
        attend_m = _sdpa(q, k, v, None, keep)
        row["sdpa+mask"] = graph_us(_step(q, k, v, None, lambda q, a, b, _, attend_m=attend_m: attend_m(q, a, b))[0])
        for name, cfg in settings.items():
            for tag, mod, mask in (("", decode_new, None), ("+row", decode_new, keep), ("+tile", decode_old, keep)):
                def att(q, a, b, layer, mod=mod, mask=mask, cfg=cfg):
                    red = None if cfg.group_size == 1 else (*layer.reduced, 64)
                    return mod.decode_attention(q, a, b, causal=True, attn_mask=mask, reduced=red)[0]
                fn, call, layer = _step(q, k, v, cfg, att)
                row[name + tag] = graph_us(fn)
            if n == lens[0]:  # the two paths agree bit for bit, batch 2, random key mask
                q2, k2, v2 = q.expand(2, -1, -1, -1).contiguous(), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
                _, _, layer2 = _step(q2, k2.contiguous(), v2.contiguous(), cfg, lambda *a: None)
                red = None if cfg.group_size == 1 else (*layer2.reduced, 64)
                a = decode_new.decode_attention(q2, layer2.keys, layer2.values, attn_mask=rand_keep, reduced=red)
                b = decode_old.decode_attention(q2, layer2.keys, layer2.values, attn_mask=rand_keep, reduced=red)
                row[name + " same"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
with open(f"{out}/mask_ab.json", "w") as f:
    json.dump(rows, f, indent=1)
names = [k for k in rows[0] if k not in ("d", "n") and not k.endswith("same")]
print("| d | cached | " + " | ".join(names) + " |")
print("|" + "---|" * (len(names) + 2))
for r in rows:
    print(f"| {r['d']} | {r['n']} | " + " | ".join(f"{r[k]:.1f}" for k in names) + " |")
print("same:", {k: v for r in rows for k, v in r.items() if k.endswith("same")})
