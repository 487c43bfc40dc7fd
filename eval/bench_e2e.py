"""End-to-end latency with random weights of real geometries, ``sdpa`` against ``distr`` settings, one GPU:

- Llama-3.2-1B shape (16 layers, hidden 2048, 32 query / 8 KV heads, head_dim 64) or with ``--llama 8b`` the
  Llama-3.1-8B shape (32 layers, hidden 4096, 32 / 8 heads, head_dim 128): prefill at each ``--prefill`` length
  (batch 1, last-token logits only, into the dynamic cache that a plain ``model(ids)`` makes), greedy decode
  tokens/s after each ``--decode-prompt`` (the steps after the first new token, timed inside one generation by
  CUDA events: :class:`StepClock`; a row's ``ms`` is one step), and a training step (forward + backward) at
  ``--train-seq-len``;
- ViT-B/16 shape (12 layers, hidden 768, 197 tokens): batch-256 inference.

``--compile``: both sides compiled the same way: ``torch.compile(model, fullgraph=True)`` for prefill, ViT and
the training step, and for decode a static cache with Transformers' compiled decode step
(``fullgraph=True, mode="reduce-overhead"``: CUDA graphs). Without it, eager with the dynamic cache. Times are
medians over ``--reps`` CUDA-event-timed runs after warm-up (compilation included in the warm-up). Past 32k cached
tokens, whose prefill alone takes tens of seconds at 8B, the prompt is prefilled once and each generation decodes
on from its cache (:class:`ContinuedPrompt`), with half as many runs and one warm-up generation (the compiled
decode step is compiled and its CUDA graphs recorded within the first generation's steps).

``sdpa_causal`` (a setting this module registers): SDPA with ``distr``'s mask function. Compiled, Transformers
(5.17, torch < 2.14) hands ``sdpa`` a dense mask even where none is needed (a causal prefill with no padding; ViT,
all True), which keeps SDPA off its FlashAttention and cuDNN paths (ViT: Inductor's fp32 math decomposition);
``distr_mask`` drops that mask (:mod:`hf_distrattn.integration`), so ``sdpa_causal`` is the peer given the same:
SDPA at its best. Eager, the two are one. A compiled call without a cache
(``use_cache=False``) gets the dense mask on every side: Transformers' check for packed sequences in
``position_ids`` cannot run while tracing, so its mask function stays data-dependent. Every row here has a cache:
prefill and training step make the dynamic one (``config.use_cache``), decode the static one.

``--profile``: each prefill, training-step and ViT row also holds its top CUDA kernels by device time
(:func:`top_kernels`), to see where a setting loses; each decode row those of one decode step
(:func:`step_kernels`) and its device time in all kernels (``device_ms``, against the step's ``ms``). Compiled
decode rows count the CUDA graphs that Inductor skipped (``cudagraph_skips``: a skipped graph runs the step's
launches from the host, which a host-bound decode pays per token). A row also holds hf_distrattn's warnings while
it ran (:func:`noted`).

    python -m hf_distrattn.eval.bench_e2e --compile --json results/e2e.json --markdown results/e2e.md
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import time
import warnings
from functools import partial

import torch
from torch._dynamo.utils import counters
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
    ViTConfig,
    ViTForImageClassification,
)

from ..settings import apply_setting, parse_settings
from .common import cuda_ms, write_results

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)
LLAMA_SHAPES = {"1b": ("llama-3.2-1b-shape", LLAMA_1B),
                "8b": ("llama-3.1-8b-shape", LLAMA_1B | dict(hidden_size=4096, intermediate_size=14336,
                                                             num_hidden_layers=32, head_dim=128,
                                                             tie_word_embeddings=False))}


LONG_PROMPT = 32768
"""Decode rows after longer prompts prefill once (:class:`ContinuedPrompt`), with one warm-up generation and half
the timed ones."""

SDPA_CAUSAL = "sdpa_causal"
SDPA_EAGER = "sdpa_eager"
"""The label of ViT's ``sdpa`` row timed eager in a compiled run: compiled, Inductor (torch 2.11) ran ViT-B/16's
SDPA as its fp32 math decomposition (47 ms against 25 ms eager on an H100), so the eager row is the peer at its
best there."""


def register_peers() -> None:
    """Register :data:`SDPA_CAUSAL`: Transformers' SDPA attention function with ``distr``'s mask function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from ..integration import distr_mask

    AttentionInterface.register(SDPA_CAUSAL, sdpa_attention_forward)
    AttentionMaskInterface.register(SDPA_CAUSAL, distr_mask)


def llama(shape: str, train: bool = False):
    """A random-weight bf16 Llama of ``shape`` (:data:`LLAMA_SHAPES`), made on the GPU (an 8B model initialised on
    the host takes minutes), its name and config."""
    name, geometry = LLAMA_SHAPES[shape]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(**geometry), dtype=torch.bfloat16)
    return model.train(train), name, geometry


def top_kernels(fn, calls: int = 3, top: int = 10) -> list:
    """The ``top`` CUDA kernels by device time over ``calls`` calls of ``fn`` (``torch.profiler``): ``[ms per call,
    launches per call, name]``, longest first: where a row's time goes. Kernels only: the host-side events that
    carry the device time of the kernels under them (``Torch-Compiled Region``, ``aten::mm``) would count it twice.
    A kernel's time runs from its start to its end, so with programmatic dependent launch (``HF_DISTRATTN_PDL=1``)
    an early-launched kernel's includes its wait for the kernel ahead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [[e.device_time_total / calls / 1000, e.count // calls, e.key[:100]]
               for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    return sorted(kernels, reverse=True)[:top]  # top=None: all


class StepClock(StoppingCriteria):
    """Times the decode steps of one ``generate`` from inside it. Stopping criteria run once per new token, after
    its forward, so a CUDA event recorded there per token brackets the steps: :meth:`step_ms` is the mean time of
    one step, the prefill (first token) excluded, without a second generation to subtract."""

    def __init__(self):
        self.events = []

    def __call__(self, input_ids, scores, **kwargs):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_ms(self) -> float:
        self.events[-1].synchronize()
        return self.events[0].elapsed_time(self.events[-1]) / (len(self.events) - 1)


def step_kernels(generate, tokens: int, top: int = 10) -> tuple[list, float]:
    """The ``top`` CUDA kernels of one decode step, as :func:`top_kernels` gives them: those of ``generate(tokens)``
    less those of ``generate(1)`` (the prefill alone), over ``tokens − 1`` steps; and the step's device time in all
    of its kernels (ms), which against the step's time says how much of it the host takes. ``tokens``: as many as
    the timed generations make, whose static cache's length the compiled decode step was compiled for (another
    length compiles it again, and the profile would hold that)."""
    def totals(n):
        return {name: (ms, count) for ms, count, name in top_kernels(lambda: generate(n), calls=1, top=None)}

    whole, prefill = totals(tokens), totals(1)
    steps = tokens - 1
    kernels = [[(ms - prefill.get(name, (0, 0))[0]) / steps, (count - prefill.get(name, (0, 0))[1]) / steps, name]
               for name, (ms, count) in whole.items()]
    kernels = sorted((k for k in kernels if k[1] > 0), reverse=True)
    return kernels[:top], sum(k[0] for k in kernels)


@contextlib.contextmanager
def noted(row: dict):
    """Measure ``row`` (a dict to fill) under this: hf_distrattn's warnings meanwhile land in ``row["warnings"]``
    (the sm_90 kernel falling back to the portable one, say), so that which kernel a row timed is on record."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield row
    shown = {}
    for w in caught:  # every warning still reaches the log, once per row
        shown.setdefault(str(w.message), w)
    for w in shown.values():
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    ours = [message for message in shown if message.startswith(("hf_distrattn", "distr_attention"))]
    if ours:
        row["warnings"] = ours
    print(json.dumps(row), flush=True)


def use(model, spec: str) -> None:
    (_, name, config), = parse_settings([spec])
    apply_setting(model, name, config)


def compiled(model, compile: bool):
    """``model`` itself, or compiled whole (a fresh compilation: the attention setting changed)."""
    if not compile:
        return model
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, dynamic=False)


def progress(row: dict, generate, *args) -> None:
    """``generate(*args)``, then a line with its wall time: a call cut off at its time limit still shows in its log
    how far a long row got (a 128k prefill, say) and what each generation cost."""
    start = time.perf_counter()
    generate(*args)
    torch.cuda.synchronize()
    print(f"{row['attn']} {row['task']}: one generation in {time.perf_counter() - start:.1f} s", flush=True)


def _compile_config() -> dict:
    from transformers.generation.configuration_utils import CompileConfig

    return dict(compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))


def _decode_kwargs(compile: bool) -> dict:
    return dict(cache_implementation="static", **_compile_config()) if compile else {}


CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
"""The name under which ``generate`` takes a cache (Transformers renamed ``past_key_values`` to ``cache`` in 5.2x)."""


def _greedy(tokens: int, clock=None) -> dict:
    return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                stopping_criteria=None if clock is None else StoppingCriteriaList([clock]))


def fresh_prompt(model, prompt, compile=False):
    """``generate(tokens, clock=None)``: greedy decoding after ``prompt``, prefilled anew (in one piece) by each call
    (into a new static cache, compiled)."""
    def generate(tokens, clock=None):
        model.generate(prompt, **_greedy(tokens, clock), **_decode_kwargs(compile))

    return generate


class ContinuedPrompt:
    """``generate(n, clock=None)`` that prefills ``prompt`` once, when made, and then decodes on from one cache:
    each call feeds :attr:`sequence` (the tokens so far) and makes ``n`` more, its first forward being the last
    token's (an eager one, as a fresh generation's prefill is), the rest the decode step (compiled: CUDA graphs).
    For long prompts, whose prefill costs more than the decoding timed after it (8B, 128k: tens of seconds). The
    cache (``static``, by default when compiled) is sized for ``calls`` calls of at most ``tokens``: the cached
    length grows by ``n`` a call, so the steps timed see ``len(prompt)`` + at most ``calls · tokens`` positions.

    The prefill runs eager (``disable_compile``): given a compile config, or on a GPU with a static cache even
    without one (Transformers' auto-compile), Transformers (5.17 to 5.25) runs each chunk of a chunked prefill
    through the compiled forward, a second graph for 16k-query chunks whose static cache is then initialised while
    tracing, so unmarked, and every CUDA graph skipped for its mutated inputs (H100 runs of the 8B row, 2026-12-06:
    96 such skips, then a segmentation fault)."""

    def __init__(self, model, prompt, calls: int, tokens: int, prefill_chunk=None, compile=False, static=None):
        self.model, self.capacity = model, prompt.shape[1] + calls * tokens + 1
        static = compile if static is None else static
        self.cache = (StaticCache(config=model.config, max_cache_len=self.capacity) if static
                      else DynamicCache(config=model.config))
        start = time.perf_counter()
        self.sequence = model.generate(prompt, prefill_chunk_size=prefill_chunk, disable_compile=True, **_greedy(1),
                                       **{CACHE_ARGUMENT: self.cache})
        self.extra = {CACHE_ARGUMENT: self.cache, **(_compile_config() if compile else dict(disable_compile=True))}
        print(f"prefill of {prompt.shape[1]} tokens in {time.perf_counter() - start:.1f} s", flush=True)

    def __call__(self, n: int, clock=None) -> None:
        if self.sequence.shape[1] + n > self.capacity:
            raise ValueError(f"this ContinuedPrompt holds {self.capacity} positions, not {self.sequence.shape[1] + n}")
        self.sequence = self.model.generate(self.sequence, **_greedy(n, clock), **self.extra)


@torch.no_grad()
def bench_llama(specs, prefill_lens, decode_prompts, decode_tokens, reps, compile, shape="1b", profile=False,
                prefill_chunk=None):
    model, model_name, geometry = llama(shape)
    rows = []
    for spec in specs:
        use(model, spec)
        run = compiled(model, compile)
        for n in prefill_lens:
            ids = torch.randint(0, geometry["vocab_size"], (1, n), device="cuda")
            prefill = partial(run, ids, logits_to_keep=1)
            with noted({"model": model_name, "attn": spec, "task": f"prefill {n}"}) as row:
                row["ms"] = cuda_ms(prefill, reps, warmup=2)
                if profile:
                    row["kernels"] = top_kernels(prefill)
            rows.append(row)
        for n in decode_prompts:
            prompt = torch.randint(0, geometry["vocab_size"], (1, n), device="cuda")
            long = n > LONG_PROMPT
            warmups, runs = (1, max(1, reps // 2)) if long else (2, reps)
            torch._dynamo.reset()
            if long or prefill_chunk:  # a chunked prefill runs eager only when made apart from the timed generations
                calls = warmups + runs + 2 * profile
                generate = ContinuedPrompt(model, prompt, calls, decode_tokens, prefill_chunk, compile)
            else:
                generate = fresh_prompt(model, prompt, compile)
            skips = counters["inductor"]["cudagraph_skips"]
            with noted({"model": model_name, "attn": spec, "task": f"decode after {n}"}) as row:
                for _ in range(warmups):  # compiles the decode step, records its CUDA graphs
                    progress(row, generate, decode_tokens)
                clocks = [StepClock() for _ in range(runs)]
                for clock in clocks:
                    progress(row, generate, decode_tokens, clock)
                step_ms = statistics.median(clock.step_ms() for clock in clocks)
                row |= {"ms": step_ms, "tokens_per_s": 1000 / step_ms}
                if compile:
                    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
                if profile:
                    row["kernels"], row["device_ms"] = step_kernels(generate, decode_tokens)  # the compiled length
            rows.append(row)
    return rows


def bench_train_step(specs, seq_len, reps, compile, shape="1b", profile=False):
    """Forward + backward of the Llama-shaped model (bf16) on one sequence of ``seq_len`` tokens."""
    model, model_name, geometry = llama(shape, train=True)
    ids = torch.randint(0, geometry["vocab_size"], (1, seq_len), device="cuda")
    rows = []
    for spec in specs:
        use(model, spec)
        run = compiled(model, compile)

        def step(run=run):
            model.zero_grad(set_to_none=True)
            run(ids, labels=ids).loss.backward()

        with noted({"model": model_name, "attn": spec, "task": f"train step {seq_len}"}) as row:
            row["ms"] = cuda_ms(step, reps, warmup=3)
            row["tokens_per_s"] = seq_len / row["ms"] * 1000
            if profile:
                row["kernels"] = top_kernels(step, top=14)
        rows.append(row)
    return rows


@torch.no_grad()
def bench_vit(specs, batch, reps, compile, profile=False):
    """ViT-B/16 inference at ``batch``; compiled, ``sdpa`` is also timed eager (:data:`SDPA_EAGER`)."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig()).to("cuda", torch.bfloat16).eval()
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    rows = []
    runs = [(spec, spec, compile) for spec in specs]  # (row name, setting, compiled)
    if compile and "sdpa" in specs:
        runs.append((SDPA_EAGER, "sdpa", False))
    for name, spec, compile_it in runs:
        use(model, spec)
        forward = partial(compiled(model, compile_it), pixel_values=pixels)
        with noted({"model": "vit-b16-shape", "attn": name, "task": f"batch {batch}"}) as row:
            row["ms"] = cuda_ms(forward, reps, warmup=2)
            row["images_per_s"] = batch / row["ms"] * 1000
            if profile:
                row["kernels"] = top_kernels(forward)
        rows.append(row)
    return rows


def label(spec: str) -> str:
    """A setting as a column heading: ``distr:group_size=4,sampled=k`` → ``distr G=4 sampled=k``."""
    return spec.replace("distr:", "distr ").replace("group_size=", "G=").replace(",", " ")


def markdown(rows) -> str:
    """One row per (model, task), one column per setting: ``sdpa``'s time (ms, or tokens/s for decode), then each
    setting's time with its speed-up over ``sdpa`` (> 1: faster)."""
    specs = list(dict.fromkeys(r["attn"] for r in rows))
    tasks = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    by = {(r["model"], r["task"], r["attn"]): r for r in rows}
    lines = ["| model | task | " + " | ".join(label(s) for s in specs) + " |", "|---|---|" + "---:|" * len(specs)]
    for model, task in tasks:
        ref = by.get((model, task, "sdpa"))
        decode = task.startswith("decode")
        cells = []
        for spec in specs:
            r = by.get((model, task, spec))
            if r is None:
                cells.append("")
                continue
            value = f"{r['tokens_per_s']:.0f} tok/s" if decode else f"{r['ms']:.2f} ms"
            if ref is not None and r is not ref:
                speedup = r["tokens_per_s"] / ref["tokens_per_s"] if decode else ref["ms"] / r["ms"]
                value += f" ({speedup:.2f}×)"
            cells.append(value)
        lines.append(f"| {model} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "distr:group_size=1,block_size=128",
                                                      "distr:group_size=4,block_size=128,grouping=lsh",
                                                      "distr:group_size=2,sampled=k,grouping=lsh",
                                                      "distr:group_size=4,sampled=k,grouping=lsh"])
    parser.add_argument("--compile", action="store_true", help="compile both sides (static cache for decode)")
    parser.add_argument("--llama", choices=sorted(LLAMA_SHAPES), default="1b", help="the Llama shape")
    parser.add_argument("--profile", action="store_true",
                        help="prefill, training-step and ViT rows: the top CUDA kernels (torch.profiler); decode "
                        "rows: those of one step and its device time")
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--decode-prompt", type=int, nargs="*", default=[4096, 32768])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, help="decode: prefill the prompt in chunks of this many tokens "
                        "(Transformers' prefill_chunk_size), once, eager (ContinuedPrompt); it cancels in tokens/s")
    parser.add_argument("--train-seq-len", type=int, default=4096, help="0: no training step")
    parser.add_argument("--vit-batch", type=int, default=256, help="0: no ViT")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    register_peers()
    rows = bench_llama(args.attn, args.prefill, args.decode_prompt, args.decode_tokens, args.reps, args.compile,
                       args.llama, args.profile, args.prefill_chunk)
    if args.train_seq_len:
        rows += bench_train_step(args.attn, args.train_seq_len, args.reps, args.compile, args.llama, args.profile)
    if args.vit_batch:
        rows += bench_vit(args.attn, args.vit_batch, args.reps, args.compile, args.profile)
    write_results(args.json, args.markdown, "bf16, random weights" + (", compiled" if args.compile else ", eager"),
                  rows, markdown(rows))


if __name__ == "__main__":
    main()
