"""Host time of one attention call on a CPU: the Python around the kernels, every Triton launch stubbed.

Where a GPU is lent rarely, this is the proxy for the eager host time that issue 19 bounds (the device numbers come
from ``bench_decode``'s ``layer_host_us``). The kernels run under the Triton interpreter's plan
(``TRITON_INTERPRET=1``, ``backend="triton"``), each launch through :mod:`hf_distrattn.kernels.launch`'s table with
a launcher that does nothing, so what is timed is our Python, PyTorch's dispatcher and autograd, and the CPU
allocations. Rows (medians of ``--rounds`` rounds of ``--calls`` calls, µs per call):

- ``decode layer``: one exact decode-layer call through Transformers' attention interface
  (``distr_attention_forward``), 32/8 heads, d=64, ``--cache`` keys, 132 multiprocessors assumed for the split;
- ``training forward`` / ``training forward+backward``: eager ``distr_attention`` with gradients, G=1, causal,
  1 × ``--tokens`` tokens, 32/8 heads, d=64, fp16 (the backward includes the CPU accumulation of the leaves'
  gradients, which a GPU does in a kernel);
- ``forward op`` / ``backward op``: ``torch.ops.hf_distrattn.attention`` and ``attention_backward`` below autograd,
  as a compiled training step calls them;
- ``sdpa training forward`` / ``forward+backward``: PyTorch's SDPA with one key (its compute nearly nil);
- ``sdpa decode layer``: Transformers' ``sdpa_attention_forward`` on one cached key, the ``decode layer`` row's
  peer (on a GPU each side also pays its launches: two Triton kernels against one).

    python -m hf_distrattn.eval.host_time --json host.json
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the plan then takes the kernel paths on a CPU

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from .. import DistrConfig, distr_attention, integration, ops  # noqa: E402
from ..kernels import backward, decode, grouping, launch, prefill, softmax  # noqa: E402
from .bench_decode import AttentionStub  # noqa: E402
from .common import write_results  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64


class _NoKernel:
    """A compiled kernel whose launcher does nothing (``launch._Cached`` calls ``run``)."""

    function = packed_metadata = None

    def run(self, *args):
        pass


class _NoCompile:
    """Stands in for a ``@triton.jit`` function in ``launch._Cached``: its first launch "compiles" a
    :class:`_NoKernel`."""

    def __init__(self, fn):
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        return lambda *args, **meta: _NoKernel()


def stub_launches() -> None:
    """Every launched kernel of the kernel modules through the launch table with a launcher that does nothing; the
    device, stream and multiprocessor count of a GPU."""
    for module in (backward, decode, grouping, prefill, softmax):
        for name, fn in vars(module).items():
            if hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # a @triton.jit function under the interpreter
                setattr(module, name, launch._Cached(_NoCompile(fn)))
    launch.driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0,
                                                                       get_current_stream=lambda device: 0))
    decode._multiprocessors = lambda device: 132


def per_call_us(fn, calls: int, rounds: int) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def calls(cache: int, tokens: int) -> dict:
    """The timed calls, by row name."""
    config = DistrConfig(group_size=1, backend="triton")
    module = AttentionStub(HEADS // KV_HEADS, HEAD_DIM, config)
    q1 = torch.randn(1, HEADS, 1, HEAD_DIM)
    k1, v1 = (torch.randn(1, KV_HEADS, cache, HEAD_DIM) for _ in range(2))

    def leaf(heads, n):  # Transformers' (B, N, H, d) layout seen as (B, H, N, d)
        return torch.randn(1, n, heads, HEAD_DIM, dtype=torch.float16).transpose(1, 2).requires_grad_()

    q, k, v = leaf(HEADS, tokens), leaf(KV_HEADS, tokens), leaf(KV_HEADS, tokens)
    dout = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.float16)
    plain = [t.detach() for t in (q, k, v)]
    args = (*plain, None, None, "projected", True, HEAD_DIM**-0.5, *ops.config_args(config), True, None, None)
    with torch.no_grad():
        out, lse, _, wt = torch.ops.hf_distrattn.attention(*args)
    backward_args = (dout, None, *plain, out, lse, wt, *args[3:])
    sq, sk, sv = (torch.randn(1, h, 1, HEAD_DIM, requires_grad=True) for h in (HEADS, KV_HEADS, KV_HEADS))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(sq, sk, sv, enable_gqa=True)  # noqa: E731

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    return {
        "decode layer": no_grad(lambda: integration.distr_attention_forward(module, q1, k1, v1, None,
                                                                            scaling=module.scaling)),
        "training forward": lambda: distr_attention(q, k, v, causal=True, config=config),
        "training forward+backward": lambda: distr_attention(q, k, v, causal=True, config=config).backward(dout),
        "forward op": no_grad(lambda: torch.ops.hf_distrattn.attention(*args)),
        "backward op": no_grad(lambda: torch.ops.hf_distrattn.attention_backward(*backward_args)),
        "sdpa training forward": sdpa,
        "sdpa training forward+backward": lambda: sdpa().sum().backward(),
        "sdpa decode layer": no_grad(lambda: sdpa_attention_forward(module, q1, sk, sv, None, scaling=module.scaling)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=8192, help="cached keys of the decode-layer call")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the training call")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    cli = parser.parse_args()
    stub_launches()
    rows = [{"call": name, "host_us": round(per_call_us(fn, cli.calls, cli.rounds), 1)}
            for name, fn in calls(cli.cache, cli.tokens).items()]
    table = "\n".join(["| call (CPU, launches stubbed) | host µs |", "|---|---:|",
                       *(f"| {row['call']} | {row['host_us']} |" for row in rows)])
    write_results(cli.json, cli.markdown, "host time per call", rows, table, gpu="none: CPU, Triton launches stubbed")


if __name__ == "__main__":
    main()
