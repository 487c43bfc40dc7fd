"""The launch cache (``kernels/launch.py``): a repeated signature skips Triton's launch path and passes the
arguments, constexprs included, in signature order to the compiled kernel; anything Triton specializes on sends
the launch back through Triton, new values that Triton does not specialize on launch directly. On CPU against a
stand-in for a compiled kernel; on a GPU, repeated training calls through the real kernels."""

import types

import pytest
import torch
from kernel_inputs import DEVICE, rand

from hf_distrattn.kernels import launch


class FakeKernel:
    """A compiled kernel: its launcher ``run(gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook,
    exit_hook, *args)`` records a direct launch; ``kernel[grid](*args)`` (Triton's runner) one with hooks."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, calls):
        self.calls = calls

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *args):
        assert (stream, function, metadata, launch_metadata, enter, exit) == (7, "function", "metadata", None, None,
                                                                              None)
        self.calls.append(("direct", (gx, gy, gz), args))

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("runner", grid, args))


class FakeJit:
    """Records launches that go through Triton; parameters X, n, scale, then constexprs A, B."""

    arg_names = ["X", "n", "scale", "A", "B"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            return FakeKernel(self.calls)
        return run


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: 7)))
    fn = FakeJit()
    return fn, launch._Cached(fn)


class SmallGpuJit(FakeJit):
    """Refuses launches deeper than ``fits`` pipeline stages as Triton does on a GPU with too little shared memory
    (``error``: what it runs out of)."""

    def __init__(self, fits, error="shared memory"):
        super().__init__()
        self.fits, self.error = fits, error

    def __getitem__(self, grid):
        def run(*args, **meta):
            if meta["num_stages"] > self.fits:
                from triton.runtime.errors import OutOfResources

                self.calls.append(("refused", meta["num_stages"]))
                raise OutOfResources(65536 * meta["num_stages"], 101376, self.error)
            return super(SmallGpuJit, self).__getitem__(grid)(*args, **meta)
        return run


@pytest.mark.parametrize("fits,error", [(1, "shared memory"), (0, "shared memory"), (1, "registers")])
def test_too_little_shared_memory_compiles_again_with_fewer_stages(fake, fits, error):
    """A GPU with less shared memory than the launch parameters were tuned for (an A100, an L4) refuses the first
    launch: it compiles again with one stage fewer until it fits, and the kernel it keeps launches directly under
    the asked-for signature. Running out of something else, or of shared memory at one stage, stays an error."""
    from triton.runtime.errors import OutOfResources

    fn = SmallGpuJit(fits, error)
    kernel = launch._Cached(fn)
    x = torch.zeros(64)
    if fits == 0 or error != "shared memory":
        with pytest.raises(OutOfResources, match=error):
            kernel[(1,)](x, 16, 0.5, A=1, B=2, num_stages=3)
        return
    kernel[(1,)](x, 16, 0.5, A=1, B=2, num_stages=3)
    kernel[(1,)](x, 16, 0.5, A=1, B=2, num_stages=3)
    assert [c[0] for c in fn.calls] == ["refused", "refused", "triton", "direct"]
    assert fn.calls[2][3]["num_stages"] == 1 and fn.calls[3][2] == (x.data_ptr(), 16, 0.5, 1, 2)


def test_repeated_signature_launches_directly_in_signature_order(fake):
    """A direct launch passes the constexprs after the arguments, in signature order, and each tensor as its address
    (the launcher then skips its per-pointer ``data_ptr()`` call and driver query)."""
    fn, kernel = fake
    x, y = torch.zeros(64), torch.ones(64)
    kernel[(3,)](x, 16, 0.5, B=2, A=1, num_warps=4)
    kernel[(3, 2)](y, 16, 0.5, B=2, A=1, num_warps=4)
    assert [c[0] for c in fn.calls] == ["triton", "direct"]
    assert fn.calls[1][1:] == ((3, 2, 1), (y.data_ptr(), 16, 0.5, 1, 2))
    assert fn.calls[0][2][0] is x  # the first launch, through Triton, gets the tensor (and Triton's checks)


def test_launch_hooks_see_every_launch(fake, monkeypatch):
    """With a Triton launch hook set (a profiler), a repeated signature launches through the compiled kernel's own
    runner, which calls the hooks, not through its bare launcher."""
    fn, kernel = fake
    x = torch.zeros(64)
    kernel[(3,)](x, 16, 0.5, B=2, A=1, num_warps=4)
    monkeypatch.setattr(launch.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    kernel[(3,)](x, 16, 0.5, B=2, A=1, num_warps=4)
    assert [c[0] for c in fn.calls] == ["triton", "runner"]
    assert fn.calls[1][1:] == ((3, 1, 1), (x, 16, 0.5, 1, 2))


@pytest.mark.parametrize("change", ["divisibility", "one", "int64", "dtype", "alignment", "constexpr", "num_warps"])
def test_what_triton_specializes_on_goes_through_triton(fake, change):
    fn, kernel = fake
    x = torch.zeros(64)
    args, meta = [x, 16, 0.5], dict(A=1, B=2, num_warps=4)
    kernel[(1,)](*args, **meta)
    if change == "divisibility":
        args[1] = 17
    elif change == "one":
        args[1] = 1
    elif change == "int64":
        args[1] = 2**32
    elif change == "dtype":
        args[0] = x.half()
    elif change == "alignment":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "constexpr":
        meta["A"] = 3
    else:
        meta["num_warps"] = 8
    kernel[(1,)](*args, **meta)
    assert [c[0] for c in fn.calls] == ["triton", "triton"]


@pytest.mark.parametrize("n,scale", [(32, 0.5), (16, 0.25), (48, 0.125)])
def test_values_triton_does_not_specialize_on_launch_directly(fake, n, scale):
    """Another multiple of 16, another float: the compiled kernel, with the new values (a decode step's key count)."""
    fn, kernel = fake
    x = torch.zeros(64)
    kernel[(1,)](x, 16, 0.5, A=1, B=2)
    kernel[(1,)](x, n, scale, A=1, B=2)
    assert [c[0] for c in fn.calls] == ["triton", "direct"]
    assert fn.calls[1][2] == (x.data_ptr(), n, scale, 1, 2)


def test_table_is_bounded(fake, monkeypatch):
    fn, kernel = fake
    monkeypatch.setattr(launch, "MAX_SIGNATURES", 4)
    for n in range(10):
        kernel[(1,)](torch.zeros(4), 16, 0.5, A=n, B=2)
    assert len(kernel.compiled) <= 4
    assert [c[0] for c in fn.calls] == ["triton"] * 10


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a GPU")
def test_cached_launches_give_triton_results():
    """Training calls through every cached kernel (grouping, forward, backward): the second call of a signature
    launches directly and must reproduce the first bit for bit; a view 2 bytes off alignment gets its own kernel."""
    from hf_distrattn import DistrConfig, distr_attention
    from hf_distrattn.kernels import backward

    config = DistrConfig(grouping="lsh", group_size=2, block_size=32, backend="triton")
    dout = rand(1, 4, 128, 64, dtype=torch.bfloat16, seed=2)

    def train(q):
        q = q.detach().requires_grad_()
        out = distr_attention(q, q, q, causal=True, config=config)
        out.backward(dout)
        return out.detach(), q.grad

    numel = 4 * 128 * 64
    base = rand(numel + 1, dtype=torch.bfloat16, seed=1)
    for q in (base[:numel].view(1, 4, 128, 64), base[1:].view(1, 4, 128, 64)):
        signatures = len(backward._dq.compiled)
        first, second = train(q), train(q)
        assert len(backward._dq.compiled) == signatures + 1
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(first, train(q.contiguous()), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_host_helpers_equal_tritons():
    """``cdiv`` and ``next_power_of_2`` replace Triton's (JIT-callable, µs per host call) in every launch: grids,
    split counts and tile sizes must not change."""
    import triton

    for n in range(1, 4100):
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for block in (1, 3, 16, 64, 128):
            assert launch.cdiv(n, block) == triton.cdiv(n, block), (n, block)
