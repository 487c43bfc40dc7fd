"""A float64, loop-by-loop DistrAttention written independently of the package: the oracle of the fuzz tests.

It computes scores in the *reduced* form the kernels use (inner size d/G per block, fused operand summed with
weights v) rather than through the package's X̃ reconstruction, so agreement checks that identity too.
"""

from __future__ import annotations

import math

import torch


def _mix32(x: int) -> int:
    """lowbias32 on a Python int in [0, 2^32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hash_sign(index: int, seed: int) -> float:
    """The hash direction entry ``index`` (row-major over rows × num_hashes): bit 31 of the counter hash."""
    key = _mix32((seed * 2654435761) & 0xFFFFFFFF)
    return -1.0 if _mix32(_mix32((index + key) & 0xFFFFFFFF) ^ key) >> 31 else 1.0


def bucket_order(block: torch.Tensor, num_hashes: int, seed: int) -> list[int]:
    """Columns of ``block`` (rows × d) sorted by sign-random-projection code (±1 directions), ties by index."""
    rows, d = block.shape
    r = torch.tensor([[hash_sign(i * num_hashes + j, seed) for j in range(num_hashes)] for i in range(rows)],
                     dtype=torch.float64)
    codes = []
    for c in range(d):
        proj = block[:, c] @ r
        codes.append(sum(1 << i for i in range(num_hashes) if proj[i] > 0))
    return sorted(range(d), key=lambda c: (codes[c], c))


def fit_group(cols: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cols (rows × G) -> (w, v) with cols ≈ (cols w) vᵀ: ``w`` picks ``u`` from a block's group columns."""
    if reduce == "sample":
        return torch.eye(cols.shape[1], dtype=cols.dtype)[0], torch.ones(cols.shape[1], dtype=cols.dtype)
    gram = cols.T @ cols
    power = gram.clone()
    for _ in range(8):  # the package's definition: C^256 · 1, normalised
        power = power @ power
        power = power / power.trace() if power.trace() > 0 else power
    v = power.sum(1)
    v = v / v.norm() if v.norm() > 0 else torch.full_like(v, cols.shape[1] ** -0.5)
    v = -v if v.sum() < 0 else v
    return v, v


def reduced_scores(x: torch.Tensor, y: torch.Tensor, group: int, block: int, num_hashes: int, seed: int,
                   reduce: str, causal_grouping: bool) -> torch.Tensor:
    """Approximate ``x @ y.T`` (x: n_x × d sampled, y: n_y × d fused) block by block at inner size d/G.

    ``causal_grouping``: the first block exact, block b grouped (order and directions) by block b-1's rows."""
    n_x, d = x.shape
    out = torch.zeros(n_x, y.shape[0], dtype=torch.float64)
    previous = torch.zeros(block, d, dtype=torch.float64)
    for start in range(0, n_x, block):
        xb = torch.zeros(block, d, dtype=torch.float64)
        xb[: min(block, n_x - start)] = x[start : start + block]
        if causal_grouping and start == 0:
            out[:block] = x[:block] @ y.T
            previous = xb
            continue
        source = previous if causal_grouping else xb
        order = bucket_order(source, num_hashes, seed)
        us, fused = [], []
        for j in range(d // group):
            cols = order[j * group : (j + 1) * group]
            w, v = fit_group(source[:, cols], reduce)
            us.append(xb[:, cols] @ w)
            fused.append(y[:, cols] @ v)
        out[start : start + block] = (torch.stack(us, 1) @ torch.stack(fused, 1).T)[: n_x - start]
        previous = xb
    return out


def naive_attention(q, k, v, *, causal=False, mask=None, scale=None, group=1, block=64, num_hashes=8, seed=0,
                    reduce="rank1", sampled="q", causal_grouping=None, window=None, softcap=None, sinks=None):
    """Per (batch, head) loops in float64; ``mask`` is additive, already ``(B, Hq, Nq, Nk)``;
    ``causal_grouping`` defaults to ``causal``. ``window``: query ``i`` sees keys ``j > i + Nk − Nq − window``;
    ``softcap``: scores ``softcap·tanh(s/softcap)``; ``sinks``: ``(Hq,)`` logits in each row's softmax
    denominator (as gpt-oss concatenates them)."""
    causal_grouping = causal if causal_grouping is None else causal_grouping
    device = q.device  # the loops run on the CPU
    q, k, v = (t.double().cpu() for t in (q, k, v))
    mask, sinks = (None if t is None else t.cpu() for t in (mask, sinks))
    batch, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(batch, h_q, n_q, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, h_q, n_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(h_q):
            qi, ki, vi = q[b, h], k[b, h // (h_q // h_kv)], v[b, h // (h_q // h_kv)]
            if group == 1:
                s = qi @ ki.T
            elif sampled == "q":
                s = reduced_scores(qi, ki, group, block, num_hashes, seed, reduce, causal_grouping)
            else:
                s = reduced_scores(ki, qi, group, block, num_hashes, seed, reduce, causal_grouping).T
            s = s * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            if mask is not None:
                s = s + mask[b, h].double()
            if causal:
                for i in range(n_q):
                    s[i, i + n_k - n_q + 1 :] = float("-inf")
            if window is not None:
                for i in range(n_q):
                    s[i, : max(i + n_k - n_q - window + 1, 0)] = float("-inf")
            for i in range(n_q):
                row = s[i] if sinks is None else torch.cat([s[i], sinks[h].double().reshape(1)])
                if torch.isinf(row).all():
                    continue
                m = row.max()
                p = torch.exp(row - m)
                lse[b, h, i] = m + torch.log(p.sum())
                out[b, h, i] = (p[:n_k] / p.sum()) @ vi
    return out.to(device), lse.to(device)
