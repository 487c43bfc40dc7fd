"""The eval commands on tiny subsets of the shared data: exact at G=1, stable JSON, one-line errors."""

import json

import pytest

from hf_distrattn.cli import main
from hf_distrattn.eval.perplexity import windows


@pytest.mark.parametrize("n,seq_len,stride", [(100, 32, 32), (100, 32, 8), (33, 32, 16), (1000, 64, 48)])
def test_windows_score_every_token_once(n, seq_len, stride):
    """Overlapping windows score every token but the very first exactly once; disjoint windows (stride =
    seq_len) leave each window's first token unscored, as the Hugging Face perplexity guide does."""
    spans = windows(n, seq_len, stride)
    scored = []
    for start, end, first in spans:
        assert end - start <= seq_len and first >= 1
        scored += list(range(start + first, end))
    starts = {start for start, _, _ in spans} if stride == seq_len else {0}
    assert scored == [t for t in range(n) if t not in starts]


def test_benchmark_tables_name_their_software_date_and_command(tmp_path, monkeypatch):
    """A benchmark's Markdown table starts with the GPU, the torch, triton and transformers versions, the UTC date
    and the command that made it, the same as its JSON environment, so that a table copied to the README says
    where it came from and how to make it again."""
    import datetime
    import sys

    from hf_distrattn.eval.common import environment, write_results

    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--compile", "--attn", "sdpa", "distr:group_size=1"])
    write_results(str(tmp_path / "r.json"), str(tmp_path / "r.md"), "bf16", [{"ms": 1.0}], "| ms |\n|---|\n| 1.0 |")
    env = json.loads((tmp_path / "r.json").read_text())["environment"]
    header = (tmp_path / "r.md").read_text().splitlines()[0]
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert env["date"].startswith(today) and env["date"] in header
    local = environment()
    assert f"torch {local['torch']}, triton {local['triton']}, transformers {local['transformers']}" in header
    assert header.endswith(f"bf16: `{env['command']}`") and env["command"].endswith("--attn sdpa distr:group_size=1")


def test_decode_benchmark_layer_calls_compute_the_same_attention():
    """The decode benchmark times one decode-layer call of ``sdpa`` and of exact ``distr`` through Transformers'
    attention interface: both must compute the same attention over the cache (GQA, one query), so that their host
    times compare like with like; its table puts them side by side with their ratio."""
    import types

    import torch

    from hf_distrattn import DistrConfig
    from hf_distrattn.eval.bench_decode import layer_call, markdown

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 32, generator=g)
    layer = types.SimpleNamespace(keys=torch.randn(1, 2, 70, 32, generator=g),
                                  values=torch.randn(1, 2, 70, 32, generator=g))
    sdpa, _ = layer_call("sdpa", q, layer)()
    distr, _ = layer_call("distr-G1", q, layer, DistrConfig(group_size=1, backend="triton"))()
    assert sdpa.shape == distr.shape == (1, 1, 8, 32)
    torch.testing.assert_close(distr, sdpa, atol=1e-5, rtol=1e-5)
    assert layer_call("distr-G2-k", q, layer) is None
    rows = [{"method": m, "d": 64, "cache": 8192, "us": 1.0, "graph_us": 1.0, "call_host_us": 1.0,
             "layer_host_us": us} for m, us in (("sdpa", 24.0), ("distr-G1", 60.0))]
    assert "| 64 | 8192 | 24.0 | 60.0 | 2.50× |" in markdown(rows)


def test_step_clock_times_each_new_token_of_one_generation(monkeypatch):
    """bench_e2e's decode clock: one event per new token, recorded inside ``generate`` (which it never stops), and
    a step's time the span from the first token's event to the last over the steps between them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

    from hf_distrattn.eval import bench_e2e

    ticks = iter(range(100))

    class Event:  # a CUDA event on a clock that advances 1 ms per recorded event
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = next(ticks)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return float(end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    clock = bench_e2e.StepClock()
    out = model.generate(torch.randint(0, 97, (1, 6)), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    assert out.shape[1] == 6 + 5 and len(clock.events) == 5
    assert clock.step_ms() == 1.0


def test_step_kernels_are_one_decode_step_without_the_prefill(monkeypatch):
    """bench_e2e's decode profile: a kernel's time and launches in ``generate(n)`` less those in ``generate(1)``,
    per step; a prefill-only kernel drops out, a kernel new in the steps keeps all of its time."""
    from hf_distrattn.eval import bench_e2e

    profiles = {17: [[9.0, 33, "gemv"], [5.0, 1, "prefill_attn"], [3.2, 16, "decode_attn"]],
                1: [[1.0, 1, "gemv"], [5.0, 1, "prefill_attn"]]}
    monkeypatch.setattr(bench_e2e, "top_kernels", lambda fn, calls, top: profiles[fn()])
    kernels, device_ms = bench_e2e.step_kernels(lambda n: n, tokens=17)
    assert kernels == [[0.5, 2.0, "gemv"], [0.2, 1.0, "decode_attn"]] and device_ms == 0.7


def test_top_kernels_count_kernels_only(monkeypatch):
    """bench_e2e's profile rows hold CUDA kernels only: a host-side event that carries the device time of the
    kernels under it (a compiled region, an aten op) would count that time twice in a decode row's device_ms."""
    import types

    import torch.profiler
    from torch.autograd import DeviceType

    from hf_distrattn.eval import bench_e2e

    def event(key, device_type, us, count):
        return types.SimpleNamespace(key=key, device_type=device_type, device_time_total=us, count=count)

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [event("Torch-Compiled Region: 0/0", cpu, 3000.0, 2), event("aten::mm", cpu, 1000.0, 2),
              event("nvjet_gemm", cuda, 1000.0, 2), event("_decode_split", cuda, 2000.0, 32),
              event("aten::empty", cpu, 0.0, 4)]

    class Profile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert bench_e2e.top_kernels(lambda: None, calls=2, top=None) == [[1.0, 16, "_decode_split"],
                                                                      [0.5, 1, "nvjet_gemm"]]


def test_decode_bench_sets_the_programs_per_multiprocessor_and_restores_them():
    """bench_decode's ``--programs-per-sm`` sweep: inside, the split-KV kernel's splits follow the count given (the
    cached split sizes recomputed); afterwards the kernel's own count and splits are back."""
    from hf_distrattn.eval.bench_decode import programs_per_sm
    from hf_distrattn.kernels import decode

    default = decode.PROGRAMS_PER_SM
    before = decode.split_keys(8, 1 << 20, 64, -1)
    narrow = decode.split_keys(8, 1 << 20, 64, -1, narrow=True)
    assert narrow[0] == before[0] * decode.NARROW_PROGRAMS_PER_SM // default  # keys at d/G ≤ 16: more programs
    with programs_per_sm(4 * default):
        assert decode.split_keys(8, 1 << 20, 64, -1)[0] == 4 * before[0]
        assert decode.split_keys(8, 1 << 20, 64, -1, narrow=True)[0] == 4 * before[0]
    with programs_per_sm(None):
        assert decode.split_keys(8, 1 << 20, 64, -1) == before
    assert decode.PROGRAMS_PER_SM == default and decode.split_keys(8, 1 << 20, 64, -1) == before
    assert decode.split_keys(8, 1 << 20, 64, -1, narrow=True) == narrow


def test_decode_bench_ragged_batch_masks_each_sequence_left_padded_on_every_side():
    """bench_decode --ragged: sequence ``i`` of a batch attends to the last ``n − i·⌊n/2B⌋`` slots only (a
    left-padded static cache; one sequence keeps them all), and SDPA and distr get the same mask, so they agree
    on what they compute."""
    import torch

    from hf_distrattn import DistrConfig
    from hf_distrattn.eval.bench_decode import _distr, _sdpa, ragged_mask

    mask = ragged_mask(4, 64, "cpu")
    assert ragged_mask(1, 64, "cpu").all() and mask.shape == (4, 1, 1, 64)
    assert mask.sum(-1).flatten().tolist() == [64, 56, 48, 40]
    assert mask[:, 0, 0, -1].all() and not mask[3, 0, 0, :24].any()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, 1, 32, generator=g)
    k, v = (torch.randn(4, 2, 64, 32, generator=g) for _ in range(2))
    want = _sdpa(q, k, v, mask=mask)(q, k, v)
    got = _distr(q, k, v, None, DistrConfig(group_size=1, backend="triton"), mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unmasked = _sdpa(q, k, v)(q, k, v)
    torch.testing.assert_close(got[0], unmasked[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[3], unmasked[3], atol=1e-3)


def test_ppl_exact_and_schema(shared, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", str(shared / "models/ref-llama-bytes"), "--text-file",
                 str(shared / "data/heldout_kjv.txt"), "--seq-len", "256", "--stride", "128", "--max-windows", "2",
                 "--attn", "sdpa", "--attn", "distr:group_size=1", "--attn", "distr:group_size=4,grouping=lsh",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"task", "model", "text_file", "dataset", "split", "seq_len", "stride", "windows",
                            "environment", "results"}
    assert {"torch", "transformers", "triton", "device", "date"} <= set(payload["environment"])
    sdpa, exact, approx = payload["results"]
    assert set(sdpa) == {"attn", "perplexity", "bits_per_token", "bits_per_byte", "nats_per_token", "tokens", "bytes"}
    assert sdpa["tokens"] == 255 + 128 and sdpa["bytes"] == sdpa["tokens"]  # byte-level tokenizer
    assert exact["bits_per_byte"] == pytest.approx(sdpa["bits_per_byte"], abs=1e-5)
    assert approx["bits_per_byte"] > sdpa["bits_per_byte"] + 0.01


def test_vit_exact_and_schema(shared, tmp_path):
    out = tmp_path / "vit.json"
    assert main(["vit", "--model", str(shared / "models/ref-vit-fmnist"), "--dataset",
                 str(shared / "data/fashion-mnist-test.parquet"), "--limit", "24", "--batch-size", "12",
                 "--attn", "sdpa", "--attn", "distr:group_size=1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"task", "model", "dataset", "images", "environment", "results"}
    sdpa, exact = payload["results"]
    assert set(sdpa) == {"attn", "top1", "top5", "images_per_s", "images"}
    assert payload["images"] == 24 and sdpa["top1"] == exact["top1"] and sdpa["top5"] == exact["top5"]
    assert 0.5 < sdpa["top1"] <= sdpa["top5"] <= 1


def test_tables_grid(shared, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
attn: [sdpa, "distr:group_size=2,grouping=lsh", "distr:group_size=4,grouping=lsh",
       "distr:group_size=2,grouping=truncate"]
lm:
  - model: {shared / 'models/ref-llama-bytes'}
    text_file: {shared / 'data/heldout_kjv.txt'}
    seq_len: 128
    max_windows: 1
    latency_seq_lens: [32, 64]
image:
  - model: {shared / 'models/ref-vit-fmnist'}
    dataset: {shared / 'data/fashion-mnist-test.parquet'}
    limit: 8
""")
    assert main(["tables", str(grid), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out/results.json").read_text())
    assert [p["task"] for p in summary["results"]] == ["perplexity", "image-classification"]
    assert len(summary["latency"]) == 8
    table = (tmp_path / "out/tables.md").read_text()
    assert table.count("| distr:group_size=2,grouping=truncate |") == 4  # ppl, vit and two latency rows
    for png in ("accuracy_vs_G.png", "latency_vs_seq_len.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
        (tmp_path / "out" / png).unlink()
    assert main(["tables", str(grid), "--out", str(tmp_path / "out"), "--replot"]) == 0  # from results.json alone
    for png in ("accuracy_vs_G.png", "latency_vs_seq_len.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["ppl", "--model", "m", "--text-file", "/no/such/file.txt"], "text file not found"),
    (["ppl", "--model", "m", "--dataset", "no-such-dataset-hf-distrattn"], "cannot load dataset"),
    (["ppl", "--model", "{shared}/models/ref-llama-bytes", "--text-file", "{shared}/data/heldout_kjv.txt",
      "--attn", "distr:group_size=5"], "unknown attention setting"),
    (["vit", "--model", "{shared}/models/ref-vit-fmnist", "--dataset", "{shared}/data/fashion-mnist-test.parquet",
      "--label-column", "fine_label"], "no column 'fine_label'"),
    (["vit", "--model", "m", "--dataset", "/no/such.parquet"], "dataset file not found"),
    (["tables", "/no/such/grid.yaml"], "grid config not found"),
])
def test_bad_arguments_give_one_line(shared, args, message, capsys, monkeypatch):
    """In process (the entry point itself: tests/test_cli.py): exit code 2, one line naming the problem."""
    import datasets.config
    import huggingface_hub.constants

    for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)  # read at import: the environment variable would come too late
    assert main([a.format(shared=shared) for a in args]) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("hf-distrattn")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]


def test_activation_errors_on_captured_layers(shared, tmp_path):
    """Errors on q/k/v captured from every layer: zero at G=1, LSH below truncation, JSON rows per setting."""
    from hf_distrattn.eval import activation_error

    out = tmp_path / "act.json"
    activation_error.main(["--lm", str(shared / "models/ref-llama-bytes"), "--text-file",
                           str(shared / "data/heldout_kjv.txt"), "--seq-len", "200", "--vit",
                           str(shared / "models/ref-vit-fmnist"), "--dataset",
                           str(shared / "data/fashion-mnist-test.parquet"), "--images", "2",
                           "--attn", "distr:group_size=1", "--attn", "distr:group_size=2,grouping=lsh",
                           "--attn", "distr:group_size=2,grouping=truncate", "--json", str(out)])
    rows = {(r["model"].split("/")[-1], r["setting"]): r for r in json.loads(out.read_text())["rows"]}
    for model, layers in (("ref-llama-bytes", 8), ("ref-vit-fmnist", 12)):
        assert len(rows[model, "distr:group_size=1"]["layers"]) == layers
        assert rows[model, "distr:group_size=1"]["max_rel_err"] < 1e-5
        assert 0.01 < rows[model, "distr:group_size=2,grouping=lsh"]["mean_rel_err"] < \
            rows[model, "distr:group_size=2,grouping=truncate"]["mean_rel_err"]


def test_captured_calls_carry_the_layer_causality(shared):
    """The LM's layers are captured causal (its grouping too), the ViT's not: the arguments the "distr" glue
    would pass."""
    from hf_distrattn.eval import activation_error

    model, inputs = activation_error.lm_inputs(str(shared / "models/ref-llama-bytes"),
                                               str(shared / "data/heldout_kjv.txt"), 40, "cpu")
    calls = activation_error.capture(model, inputs)
    assert all(c["causal"] and c["causal_grouping"] and c["q"].shape[2] == 40 for c in calls)
    assert calls[0]["k"].shape[1] == 2 and calls[0]["q"].shape[1] == 8  # GQA kept, not repeated
    assert model.config._attn_implementation != activation_error.CAPTURE


def test_kernel_table_gives_speed_ups_over_both_sdpa_peers():
    """Issue targets are stated against FlashAttention-2 and cuDNN: each cell carries both ratios."""
    from hf_distrattn.eval.bench_kernels import markdown

    rows = [{"method": m, "d": 128, "n": 4096, "causal": True, "ms": ms, "tflops": 100 / ms}
            for m, ms in (("sdpa-flash", 2.0), ("sdpa-cudnn", 1.0), ("distr-G1-b128", 0.8))]
    rows.append({"method": "sageattn-1", "d": 128, "n": 4096, "causal": True, "error": "unavailable"})
    table = markdown(rows)
    assert "| 128 | 4096 | True | 50 (1.00×, 0.50×) | 100 (2.00×, 1.00×) | 125 (2.50×, 1.25×) | — |" in table
    assert "Kernel alone" not in table
    rows[2] |= {"kernel_ms": 0.5, "portable_kernel_ms": 1.25}  # the Hopper kernel ran: both kernels alone
    assert "| 128 | 4096 | True | distr-G1-b128 | 200 (2.00×) | 80 (0.80×) |" in markdown(rows)


def test_e2e_table_is_the_readme_table():
    """bench_e2e's Markdown is the README's speed table as it stands: one row per task, ``sdpa``'s time, each
    setting's time with its speed-up (decode in tokens/s, higher is faster; prefill in ms, lower is faster)."""
    from hf_distrattn.eval import bench_e2e

    rows = [{"model": "llama", "attn": "sdpa", "task": "prefill 4096", "ms": 20.0},
            {"model": "llama", "attn": "sdpa", "task": "decode after 4096", "ms": 9.0, "tokens_per_s": 200.0},
            {"model": "llama", "attn": "distr:group_size=1", "task": "prefill 4096", "ms": 25.0},
            {"model": "llama", "attn": "distr:group_size=1", "task": "decode after 4096", "ms": 9.0,
             "tokens_per_s": 300.0}]
    table = bench_e2e.markdown(rows)
    assert table.splitlines()[0] == "| model | task | sdpa | distr G=1 |"
    assert "| llama | prefill 4096 | 20.00 ms | 25.00 ms (0.80×) |" in table
    assert "| llama | decode after 4096 | 200 tok/s | 300 tok/s (1.50×) |" in table


def test_e2e_rows_keep_our_warnings_and_only_ours(monkeypatch):
    """A row measured under bench_e2e's ``noted`` holds each distinct hf_distrattn warning raised meanwhile (a
    Hopper kernel that fell back, say) and no one else's; a quiet row has no ``warnings`` key; every warning still
    reaches the log, once per row."""
    import warnings

    from hf_distrattn.eval import bench_e2e

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    with bench_e2e.noted({"attn": "distr"}) as row:
        for _ in range(2):
            warnings.warn("hf_distrattn: the sm_90 kernel failed (X); the portable kernel runs instead", stacklevel=1)
        warnings.warn("TensorFloat32 tensor cores for float32 matrix multiplication available", stacklevel=1)
    with bench_e2e.noted({"attn": "sdpa"}) as quiet:
        pass
    assert row["warnings"] == ["hf_distrattn: the sm_90 kernel failed (X); the portable kernel runs instead"]
    assert "warnings" not in quiet
    assert sorted(shown) == sorted(["hf_distrattn: the sm_90 kernel failed (X); the portable kernel runs instead",
                                    "TensorFloat32 tensor cores for float32 matrix multiplication available"])


def test_e2e_causal_sdpa_peer_is_sdpa_without_the_traced_mask(monkeypatch):
    """bench_e2e's ``sdpa_causal`` peer: compiled, it computes ``sdpa``'s logits, and its attention gets no mask
    for a causal prefill without padding (``sdpa`` itself, traced by Transformers 5.17, gets a dense one: that
    version's skip, off while tracing, is turned off here too)."""
    import torch
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, masking_utils
    from transformers.integrations import sdpa_attention

    from hf_distrattn.eval import bench_e2e

    bench_e2e.register_peers()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        want = model(ids).logits
    masks = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)

    def spy(module, q, k, v, attention_mask, **kwargs):
        masks.append(attention_mask is None)
        return real(module, q, k, v, attention_mask, **kwargs)

    AttentionInterface.register(bench_e2e.SDPA_CAUSAL, spy)
    try:
        model.set_attn_implementation(bench_e2e.SDPA_CAUSAL)
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    finally:
        bench_e2e.register_peers()
    assert masks and all(masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_speed_plot_from_benchmark_rows(tmp_path):
    """bench_kernels --replot draws the speed plot from an earlier run's JSON (no GPU needed)."""
    from hf_distrattn.eval import bench_kernels

    rows = [{"method": m, "d": 64, "n": n, "causal": c, "tflops": t * n / 1024}
            for m, t in (("sdpa-flash", 300), ("distr-G2-b128", 350)) for n in (1024, 4096) for c in (False, True)]
    rows.append({"method": "sageattn-1", "d": 64, "n": 1024, "causal": True, "error": "unavailable"})
    (tmp_path / "k.json").write_text(json.dumps({"environment": {}, "rows": rows}))
    bench_kernels.main(["--replot", str(tmp_path / "k.json"), "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("static", [False, True])
def test_a_continued_prompt_decodes_as_one_generation(static):
    """bench_e2e's long-prompt decode: the prompt prefilled once (in chunks), then three generations of 5 tokens
    each continuing from the cache, make the tokens of one generation of 16 (the first token with the prefill),
    with keys held reduced (``sampled="k"``, whose layers the cache swaps in); a fourth call overruns its size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_distrattn import DistrConfig, configure
    from hf_distrattn.eval import bench_e2e

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    model.set_attn_implementation("distr")
    configure(model, DistrConfig(grouping="lsh", group_size=2, block_size=16, sampled="k"))
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    whole = model.generate(ids, cache_implementation="static", **bench_e2e._greedy(16))
    continued = bench_e2e.ContinuedPrompt(model, ids, calls=3, tokens=5, prefill_chunk=13, static=static)
    for _ in range(3):
        continued(5)
    assert torch.equal(continued.sequence, whole)
    assert type(continued.cache.layers[0]).__name__ == ("ReducedStaticLayer" if static else "ReducedDynamicLayer")
    with pytest.raises(ValueError, match="holds 56 positions"):
        continued(1)


def test_a_continued_prompt_prefills_eager_and_decodes_compiled(monkeypatch):
    """Compiled, the long-prompt decode's chunked prefill stays out of the compiled forward (Transformers would run
    each chunk through it when given a compile config: a second graph whose cache is initialised while tracing)
    and its generations' decode steps go through it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    from hf_distrattn.eval import bench_e2e

    config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    config._compile_all_devices = True  # a CPU counts as a device to compile for
    monkeypatch.setattr(bench_e2e, "_compile_config", lambda: dict(compile_config=config))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    compiled = []

    def compiled_call(compile_config):
        def call(*args, **kwargs):
            compiled.append(kwargs["input_ids"].shape[1])
            return model(*args, **kwargs)
        return call

    monkeypatch.setattr(model, "get_compiled_call", compiled_call)
    # on a GPU, Transformers compiles a static cache's generation unasked (auto-compile); so here, on the CPU
    model.generation_config.compile_config = config
    continued = bench_e2e.ContinuedPrompt(model, torch.randint(1, 97, (1, 24)), calls=1, tokens=4, prefill_chunk=8,
                                          compile=True)
    assert compiled == []
    continued(4)
    assert compiled == [1, 1, 1]  # the first new token's forward is eager, the three decode steps compiled
