"""The Hopper (Gluon) forward kernel, ``kernels/hopper.py``.

On any machine: the kernel builds for sm_90 (offline, in a subprocess without ``TRITON_INTERPRET``, which Gluon
cannot compile under), with its shared memory within an H100's 227 KB, no register spills, TMA loads, ``wgmma`` and
the register reallocation between partitions; and the planner's rule for which calls it takes. On a Hopper GPU:
its outputs and log-sum-exps against float64 exact attention (``G = 1``) and against the portable kernel on the
same grouping (``G > 1``), over odd lengths, GQA, causal calls with fewer or more queries than keys (rows that see
no key), float16 and bfloat16, head dims 64 and 128.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from kernel_inputs import DEVICE, rand

VARIANTS = [(64, 1, False), (128, 1, True), (128, 2, True), (64, 4, False)]  # (d, G, causal)
H100_SHARED = 227 * 1024


def _build(d: int, group: int, causal: bool) -> dict:
    """Compile the kernel for sm_90 and report what the tests check."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from hf_distrattn.kernels import hopper

    dg, n = d // group, 256
    u = torch.empty(1, 4, n, dg, dtype=torch.bfloat16)
    kv = torch.empty(1, 2, n, d, dtype=torch.bfloat16)
    wt = hopper._desc(torch.empty(1, 4, 2, dg, d, dtype=torch.bfloat16), [1, 1, 1, dg, d]) if group > 1 else \
        hopper._desc(kv, [1, 1, 16, 16])
    values = dict(u_desc=hopper._desc(u, [1, 1, 64, dg]), k_desc=hopper._desc(kv, [1, 1, 128, d]),
                  v_desc=hopper._desc(kv, [1, 1, 128, d]), wt_desc=wt, out_ptr=kv, lse_ptr=u.float(),
                  qk_scale=0.1, n_q=n, n_k=n, heads=4, kv_group=2, first_block=0, n_blocks=2, so_b=n, so_h=n,
                  so_m=n, sl_b=n, sl_h=n)
    constants = dict(CAUSAL=causal, BLOCK_N=128, D=d, DG=dg, STAGES=2, G=group)
    fn = hopper._distr_fwd_sm90
    signature = {name: "constexpr" if name in constants else "fp32" if isinstance(values[name], float)
                 else "i32" if isinstance(values[name], int) else mangle_type(values[name]) for name in fn.arg_names}
    source = GluonASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))
    ops, _ = _sass(kernel)
    return dict(shared=kernel.metadata.shared, spills=_spills(ops), wgmma=sum("HGMMA" in o for o in ops),
                tma=sum("UTMALDG" in o for o in ops), setmaxnreg=sum("SETMAXREG" in o for o in ops))


def _sass(kernel) -> tuple[list, int]:
    """A compiled kernel's SASS instructions (``nvdisasm``) and registers per thread (``cuobjdump -res-usage``)."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hf_distrattn_sm90_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    resources = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True).stdout
    os.remove(path)
    return sass.splitlines(), int(re.search(r"REG:(\d+)", resources).group(1))


def _spills(ops: list) -> int:
    return sum(" STL" in o or " LDL" in o for o in ops)


PORTABLE = [(128, 1, 128, 1), (128, 1, 128, 2), (128, 1, 128, 0), (128, 2, 128, 1), (128, 4, 128, 1),
            (64, 1, 128, 1), (128, 1, 64, 1)]  # the portable kernel: (d, G, block_size, MASK_KIND)


def _compile_sm90(fn, constants: dict, types: dict, usage: bool = False, unaligned: tuple = (), **options) -> dict:
    """Compile a ``@triton.jit`` kernel for sm_90: pointers ``*bf16`` and integers ``i32`` unless ``types`` says
    otherwise, every pointer and integer but the ``unaligned`` ones 16-divisible as Triton specializes a real call's
    (which changes its shared-memory plan and registers). ``usage``: also its registers per thread and spilled
    accesses (``cuobjdump``, ``nvdisasm``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(Lse="*fp32", scale="fp32", softcap="fp32", Ranges="*i32") | types
    signature = {name: "constexpr" if name in constants else types.get(name, "*bf16" if name[0].isupper() else "i32")
                 for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature[name] not in ("constexpr", "fp32") and name not in unaligned}
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    if not usage:
        return dict(shared=kernel.metadata.shared)
    ops, registers = _sass(kernel)
    return dict(shared=kernel.metadata.shared, registers=registers, spills=_spills(ops))


DECODE = [(64, 1, 1), (64, 4, 1), (64, 4, 0), (128, 1, 1), (128, 2, 2), (128, 4, 1)]  # (d, G, MASK_KIND)


def _build_decode(d: int, group: int, mask_kind: int) -> dict:
    """The split-KV decode kernel as a Llama decode step launches it (4 query heads per KV head: 16 rows, tiles of
    64 keys, :data:`decode.LAUNCH`), exact or reading keys reduced to ``d/G`` columns, over a static cache whose
    capacity is not a multiple of 16 (``generate`` sizes it to the prompt and the new tokens): the most registers;
    a mask is the cache's key mask, one row shared by the program's query rows (``MASK_ROW``)."""
    from hf_distrattn.kernels import decode

    constants = dict(CAUSAL=False, WINDOWED=False, SOFTCAP=False, MASK_KIND=mask_kind, MASK_ROW=mask_kind > 0,
                     IEEE=False, BLOCK_M=16, BLOCK_N=64, D=d, G=min(group, 2), DG=d // group, PDL=False)
    types = dict(Grp="*i32", W="*fp32", Part="*fp32", Mask="*i1" if mask_kind == 1 else "*bf16")
    return _compile_sm90(decode._decode_split.fn, constants, types, usage=True, unaligned=("n_k", "capacity", "sm_b"),
                         **decode.LAUNCH)


def _build_portable(d: int, group: int, block_m: int, mask_kind: int) -> dict:
    """The portable forward with :func:`prefill.launch_params`."""
    from hf_distrattn.kernels import prefill

    params = prefill.launch_params(block_m, d, group, mask_kind > 0)
    constants = dict(CAUSAL=False, WINDOWED=False, SOFTCAP=False, MASK_KIND=mask_kind, IEEE=False,
                     FOLD_SCALE=params["fold_scale"], SUBSPACE=False, BLOCK_M=block_m, BLOCK_N=params["block_n"],
                     D=d, G=group, DG=d // group, DR=d)
    return _compile_sm90(prefill._distr_fwd.fn, constants, dict(Mask="*i1" if mask_kind == 1 else "*bf16"),
                         num_warps=params["num_warps"], num_stages=params["num_stages"])


MASKED = [("tiles", 1), ("tiles", 2), ("_dq", 1), ("_dkdv", 1), ("_dkdv", 2)]  # (kernel, MASK_KIND)


def _build_masked(name: str, mask_kind: int) -> dict:
    """The dense-mask pass (:func:`softmax.mask_tiles`' kernel) and the masked backward kernels at head dim
    128 with :func:`backward.launch_params`."""
    from hf_distrattn.kernels import backward, softmax

    mask = dict(Mask="*i1" if mask_kind == 1 else "*bf16")
    if name == "tiles":
        constants = dict(ADDITIVE=mask_kind == 2, BLOCK_M=128, BLOCK_N=128)
        return _compile_sm90(softmax._mask_tiles.fn, constants, mask | dict(Flags="*i8"), num_warps=4)
    params = backward.launch_params(128, torch.bfloat16)[name[1:]]
    constants = dict(CAUSAL=False, WINDOWED=False, SOFTCAP=False, MASK_KIND=mask_kind, IEEE=False,
                     BLOCK_M=params["block_m"], BLOCK_N=params["block_n"], D=128, PROJECT_BLOCK=0,
                     PROJECT_CAUSAL=False, DG_PAD=16, SUB_BLOCK=0) | ({"HAS_DLSE": False} if name == "_dq" else {})
    floats = dict(Delta="*fp32", Lse2="*fp32", DLse="*fp32")
    return _compile_sm90(getattr(backward, name).fn, constants, mask | floats, num_warps=params["num_warps"],
                         num_stages=params["num_stages"])


@pytest.fixture(scope="module")
def builds():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {tuple(r["variant"]): r for r in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("variant", VARIANTS)
def test_builds_for_sm90_within_shared_memory_without_spills(builds, variant):
    r = builds[variant]
    assert r["shared"] <= H100_SHARED
    assert r["spills"] == 0
    assert r["wgmma"] > 0 and r["tma"] > 0 and r["setmaxnreg"] > 0


@pytest.mark.parametrize("variant", PORTABLE)
def test_portable_kernel_launches_fit_an_h100(builds, variant):
    """Where the Hopper kernel does not run (a mask, for one), the portable kernel does, with
    :func:`prefill.launch_params`' tiles and stages: each must fit 227 KB of shared memory. A mask tile is one
    more pipelined operand: three stages of 128 × 128 tiles at ``d = 128`` with it need 256 KB, which a compiled
    8B-shape prefill (Transformers builds the causal mask while tracing) met on an H100."""
    assert builds[("portable", *variant)]["shared"] <= H100_SHARED


@pytest.mark.parametrize("variant", DECODE)
def test_decode_kernel_builds_for_an_h100_at_its_programs_per_sm(builds, variant):
    """The split-KV decode kernel compiles for sm_90 without spilling registers, and its registers let as many
    programs share a multiprocessor as :func:`decode.split_keys` plans for (``NARROW_PROGRAMS_PER_SM`` where keys
    are read at ``d/G ≤ 16`` columns): 128 threads × registers × programs ≤ 65,536. A static cache's mask costs
    registers (d=64, G=4: 96 → 128, the most that four programs allow; Triton 3.9, docs/design.md D18)."""
    from hf_distrattn.kernels import decode

    d, group, _ = variant
    r = builds[("decode", *variant)]
    programs = decode.NARROW_PROGRAMS_PER_SM if d // group <= 16 else decode.PROGRAMS_PER_SM
    assert r["spills"] == 0
    assert r["registers"] * 128 * programs <= 65536, r


@pytest.mark.parametrize("variant", MASKED)
def test_masked_kernels_build_for_an_h100(builds, variant):
    """What the interpreter cannot show: the dense-mask pass and the backward kernels with a mask (and the mask's
    tile ranges) compile for sm_90 and fit 227 KB of shared memory."""
    assert builds[("masked", *variant)]["shared"] <= H100_SHARED


def test_plan_sends_it_the_calls_it_takes(monkeypatch):
    """The rule of ``plan.sm90_refusal`` (on any machine, the GPU check stubbed): 16-bit, head dim 64 or 128,
    ``G > 1`` only at 128 and with blocks of 128, head dim 64 only from 1024 keys, no mask, window or softcap,
    TMA-addressable tensors."""
    from hf_distrattn import plan

    monkeypatch.setattr(plan, "_on_hopper", lambda q: True)
    monkeypatch.setattr(plan, "SM90", True)
    q, k = (torch.zeros(1, 4, 256, 128, dtype=torch.bfloat16) for _ in range(2))

    def takes(q=q, k=k, group=1, block=64, masked=False, window=None, softcap=None):
        return plan.sm90_refusal(q, k, k, group, block, masked, window, softcap) is None

    assert takes() and takes(group=2, block=128) and takes(group=4, block=128)
    q64, k64 = (torch.zeros(1, 4, 1024, 64, dtype=torch.bfloat16) for _ in range(2))
    assert takes(q=q64, k=k64) and takes(q=q64[:, :, :1], k=k64)  # head dim 64, exact, 1024 keys
    assert not takes(q=q64[:, :, :1023], k=k64[:, :, :1023])  # fewer keys: the portable kernel is faster
    assert not takes(q=q64, k=k64, group=2, block=128)
    assert not takes(group=2, block=64)
    assert not takes(q=q.float(), k=k.float()) and not takes(q=q[..., :96].contiguous(), k=k[..., :96].contiguous())
    assert not takes(masked=True) and not takes(window=64) and not takes(softcap=30.0)
    assert not takes(q=q[:, :, :0])
    assert takes(q=torch.zeros(1, 256, 4, 128, dtype=torch.bfloat16).transpose(1, 2))  # Transformers' layout
    assert not takes(k=torch.zeros(4 * 256 * 128 + 1, dtype=torch.bfloat16)[1:].view(1, 4, 256, 128))  # 2-byte offset
    monkeypatch.setattr(plan, "SM90", False)
    assert not takes()


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_a_failing_sm90_kernel_falls_back_to_the_portable_one_with_one_warning(monkeypatch):
    """A Triton whose Gluon the kernel does not build on, say: the call still returns the portable kernel's
    result, one warning names the error, and later calls go to the portable kernel without another."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from hf_distrattn import plan
    from hf_distrattn.config import DistrConfig
    from hf_distrattn.kernels import hopper, prefill

    def broken(*args, **kwargs):
        raise RuntimeError("no such Gluon op\ndetails")

    monkeypatch.setattr(plan, "_on_hopper", lambda q: True)
    monkeypatch.setattr(plan, "SM90", True)
    monkeypatch.setattr(hopper, "attention", broken)
    q, k, v = (rand(1, 2, 70, 128, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))  # head dim 128: any length
    call = dict(causal=True, config=DistrConfig(group_size=1, block_size=64))
    with pytest.warns(UserWarning, match=r"sm_90 kernel failed \(RuntimeError: no such Gluon op\)"):
        out, lse = prefill.distr_attention_triton(q, k, v, **call)
    want, want_lse = prefill.distr_attention_triton(q, k, v, portable=True, **call)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert not plan.SM90
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(prefill.distr_attention_triton(q, k, v, **call)[0], want)
    assert not [w for w in caught if "sm_90" in str(w.message)]


HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("b,hq,hk,n_q,n_k,d,causal,dtype", [
    (2, 4, 2, 1000, 1000, 64, False, torch.bfloat16), (2, 4, 2, 1000, 1000, 128, True, torch.bfloat16),
    (1, 4, 4, 515, 515, 128, False, torch.float16), (1, 8, 2, 300, 1100, 64, True, torch.float16),
    (1, 2, 1, 200, 100, 64, True, torch.bfloat16)])
def test_matches_float64_and_the_portable_kernel(group, b, hq, hk, n_q, n_k, d, causal, dtype):
    from hf_distrattn import reference
    from hf_distrattn.config import DistrConfig
    from hf_distrattn.grouping import hash_directions
    from hf_distrattn.kernels import hopper, prefill

    q = rand(b, n_q, hq, d, dtype=dtype, seed=1).transpose(1, 2)  # Transformers' layout
    k, v = rand(b, hk, n_k, d, dtype=dtype, seed=2), rand(b, hk, n_k, d, dtype=dtype, seed=3)
    out, lse = torch.empty_like(q), torch.empty(b, hq, n_q, device=DEVICE)
    if group == 1:
        hopper.attention(q, k, v, None, out, lse, causal=causal, scale=d ** -0.5, group_size=1)
        want, want_lse = reference.attention(q.double(), k.double(), v.double(), causal=causal)
        tol = 1e-2
    else:
        config = DistrConfig(group_size=group, block_size=128, grouping="lsh", sampled="q")
        prepared = prefill.prepare(q, k, v, config, hashes=hash_directions(128, config.num_hashes, 0, DEVICE))
        hopper.attention(*prepared[:3], prepared[3], out, lse, causal=causal, scale=d ** -0.5, group_size=group)
        want, want_lse = prefill.distr_attention_triton(q, k, v, causal=causal, config=config, prepared=prepared,
                                                          portable=True)
        tol = 2e-2
    assert not out.isnan().any()
    assert ((out.double() - want).norm() / want.norm()).item() < tol
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)  # rows that see no key: -inf and a zero output
    assert (out[~seen] == 0).all()
    assert (lse[seen] - want_lse[seen].float()).abs().max().item() < 2e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group,block,n", [(1, 64, 700), (2, 128, 700), (4, 128, 129)])
def test_fused_path_runs_it_with_causal_grouping(monkeypatch, group, block, n):
    """Through the fused path's function: causal grouping's exact first block and the grouped rest are two
    launches into one output; the portable kernel computes the same."""
    from hf_distrattn import plan
    from hf_distrattn.config import DistrConfig
    from hf_distrattn.grouping import hash_directions
    from hf_distrattn.kernels import prefill

    monkeypatch.setattr(plan, "SM90", True)
    q, k, v = (rand(1, 4, n, 128, dtype=torch.bfloat16, seed=s) for s in (4, 5, 6))
    config = DistrConfig(group_size=group, block_size=block, grouping="lsh", sampled="q")
    call = dict(causal=True, config=config, causal_grouping=True,
                hashes=hash_directions(block, config.num_hashes, 0, DEVICE))
    assert plan.sm90_refusal(q, k, v, group, block, False, None, None) is None
    out, lse = prefill.distr_attention_triton(q, k, v, **call)
    want, want_lse = prefill.distr_attention_triton(q, k, v, portable=True, **call)
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
    assert (lse - want_lse).abs().max().item() < 2e-2


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_a_compiled_vit_runs_it(monkeypatch):
    """A ViT compiled whole (197 tokens, head dim 128, no mask, queries in Transformers' (B, N, H, d) layout) runs
    the Hopper kernel as eager does, with no fallback, and computes eager's logits. (The fourteenth session's
    ViT-B/16 rows ran the portable kernel compiled; a failure here names the reason in its message. At head dim 64
    197 keys go to the portable kernel, which is faster there: ``plan.SM90_MIN_KEYS_D64``.)"""
    from transformers import ViTConfig, ViTForImageClassification

    import hf_distrattn
    from hf_distrattn import plan
    from hf_distrattn.kernels import hopper, prefill

    monkeypatch.setattr(plan, "SM90", True)
    launches, refusals = [], []
    real, refuse = hopper.attention, prefill.sm90_refusal
    monkeypatch.setattr(hopper, "attention", lambda *args, **kwargs: launches.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(prefill, "sm90_refusal", lambda *args: refusals.append(refuse(*args)) or refusals[-1])
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)  # d=128
    model = ViTForImageClassification(config).to(DEVICE, torch.bfloat16).eval()
    model.set_attn_implementation("distr")
    hf_distrattn.configure(model, hf_distrattn.DistrConfig(group_size=1))
    pixels = torch.randn(4, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = model(pixel_values=pixels).logits
        eager_launches = len(launches)
        compiled = torch.compile(model, fullgraph=True)(pixel_values=pixels).logits
    why = ([str(w.message) for w in caught if "hf_distrattn" in str(w.message)],
           {note[0].format(*note[1:]) for note in refusals if note is not None})
    assert eager_launches == 2 and len(launches) > eager_launches, why
    assert plan.SM90 and not any(why), why
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=5e-2)


if __name__ == "__main__":  # the build report, one JSON line per variant (run by the ``builds`` fixture)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for variant in VARIANTS:
        print(json.dumps(dict(variant=variant) | _build(*variant)), flush=True)
    for variant in PORTABLE:
        print(json.dumps(dict(variant=("portable", *variant)) | _build_portable(*variant)), flush=True)
    for variant in MASKED:
        print(json.dumps(dict(variant=("masked", *variant)) | _build_masked(*variant)), flush=True)
    for variant in DECODE:
        print(json.dumps(dict(variant=("decode", *variant)) | _build_decode(*variant)), flush=True)
