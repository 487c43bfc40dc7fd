"""Kernel launches with less host time.

``kernel[grid](*args, **meta)`` spends tens of µs of Python per launch (binding and specializing ~45 arguments,
the cache key, launch metadata), which shows where eager calls are bound by the host (docs/design.md, B13-B17;
inside a CUDA graph it does not matter). :func:`cached` wraps a ``@triton.jit`` function so that
``kernel[grid](*args, **meta)`` goes through Triton the first time it sees a *signature*, keeps the compiled
kernel Triton returns, and afterwards calls its launcher directly: ``compiled.run(grid, stream, function,
metadata, hooks, *args)``, the call Triton's own ``compiled[grid](*args)`` makes after looking up the current
device and stream, building a closure and the launch metadata for its launch hooks (Triton ≥ 3.5 keeps an empty
hook chain, so it builds them at every launch, and its launcher calls the empty chains): host time per launch.
Where a launch hook is set (a profiler), launches go through ``compiled[grid]`` so that the hooks see them.

A direct launch passes each tensor as its address, a Python ``int``: the launcher then takes it as it is,
where for a tensor it calls ``data_ptr()`` and asks the driver whether the address is device memory
(``cuPointerGetAttribute``), per pointer and launch. That check is Triton's error for a CPU tensor; here a
signature's first launch goes through Triton and gets it, and the ops check that every tensor they pass shares
``q``'s device (inputs, mask, sinks), so a later launch cannot meet one.

The signature holds everything Triton specializes on: of an integer, whether it equals 1, whether 16 divides it
and its integer type's range (Triton's ``i32``/``i64``/``u64``); of a float, its type only (Triton passes it as
fp32, unspecialized); of a tensor, its dtype and whether 16 divides its address; the keyword arguments
(constexprs, ``num_warps``, ``num_stages``) and the current device. A hit therefore reuses the kernel Triton itself
would pick, with this call's values: a decode step whose key count grew by one launches directly (an exact-value
key missed at every step). The table is emptied past :data:`MAX_SIGNATURES`. Under ``TRITON_INTERPRET=1`` kernels
are not wrapped.

Shared memory: launch parameters are tuned on an H100 (227 KB per block); a GPU with less (an A100's 163 KB, the
99 KB of an L4 or RTX 4090) refuses a deep pipeline with Triton's ``OutOfResources`` before anything runs. The
launch then compiles again with one pipeline stage fewer (the same computation, less overlap of loads) until it
fits, and keeps that kernel under the asked-for signature, so later calls go straight to it.
"""

from __future__ import annotations

import functools
import os

import torch
from triton import knobs
from triton.runtime import JITFunction, driver
from triton.runtime.errors import OutOfResources

MAX_SIGNATURES = 1024
PDL = os.environ.get("HF_DISTRATTN_PDL", "0") == "1"
"""Programmatic dependent launch of the decode step's kernels where the GPU has it (:func:`pdl`):
``HF_DISTRATTN_PDL=1``. Off by default: on an H100 it saved 0.4-0.8 µs of a decode step at head dim 64 and
nothing at 128, and the compiled end-to-end decode measured with it was no faster (docs/design.md D17)."""


@functools.lru_cache
def pdl(device: int) -> bool:
    """Whether a kernel on CUDA device ``device`` (``-1``: a CPU under the interpreter, which has none) is launched
    by programmatic dependent launch (``launch_pdl``, sm_90+). It may then start before the kernel ahead of it in
    the stream has finished; its programs wait (``griddepcontrol.wait``) for that whole grid to finish and its
    writes to be visible before they read anything, and the kernel ahead lets it launch
    (``griddepcontrol.launch_dependents``) once all of its programs have started. The launch gap between the two,
    a fixed cost of every decode step (docs/design.md D17), then hides behind the kernel ahead's tail."""
    return PDL and device >= 0 and torch.cuda.get_device_capability(device)[0] >= 9


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉`` in plain Python: ``triton.cdiv`` is a JIT-callable function whose host call costs µs."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two ``≥ n`` (1 for ``n ≤ 1``), in plain Python, as :func:`cdiv`."""
    return 1 << max(n - 1, 0).bit_length()


def _signature(args) -> tuple[tuple, list]:
    """What Triton's launch specializes on, for the positional arguments, and the arguments as a direct launch
    passes them, in one pass (most arguments are strides). An ``int`` in ``i32`` range other than 1 keys on its
    divisibility by 16 alone, any other ``int`` on all four facts; a tensor on its dtype, wrapped in a tuple when its
    address is not 16-aligned, and is passed as that address; a ``float`` on its type; anything else (``bool``,
    ``None``) on its type and value."""
    key, raw = [], []
    add_key, add_raw = key.append, raw.append
    for a in args:
        kind = type(a)
        if kind is int:
            add_key(a % 16 == 0 if a != 1 and -2147483648 <= a < 2147483648
                    else (a == 1, a % 16 == 0, -2147483648 <= a < 2147483648, a < 2**63))
            add_raw(a)
        elif isinstance(a, torch.Tensor):
            address = a.data_ptr()
            add_key(a.dtype if address % 16 == 0 else (a.dtype,))
            add_raw(address)
        else:
            add_key(float if kind is float else (kind, a))
            add_raw(a)
    return tuple(key), raw


def _set(hook) -> bool:
    """A launch hook is set: a function, or (Triton ≥ 3.5) a chain of hooks that is not empty."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    """Whether a Triton launch hook is set (no generator: this runs at every launch)."""
    return _set(knobs.runtime.launch_enter_hook) or _set(knobs.runtime.launch_exit_hook)


class _Cached:
    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}
        self.device = self.stream = None  # the driver's functions, looked up at the first launch

    def __getitem__(self, grid):
        return lambda *args, **meta: self._launch(grid, args, meta)

    def _launch(self, grid, args, meta):
        if self.device is None:
            self.device, self.stream = driver.active.get_current_device, driver.active.get_current_stream
        device = self.device()
        signature, raw = _signature(args)
        key = (device, signature, *meta.items())
        entry = self.compiled.get(key)
        if entry is None:
            kernel, meta = self._first_launch(grid, args, meta)
            if len(self.compiled) >= MAX_SIGNATURES:
                self.compiled.clear()
            names = self.fn.arg_names[len(args):]  # the parameters given by keyword, in signature order
            self.compiled[key] = kernel, tuple(meta[name] for name in names)
            return
        kernel, constexprs = entry
        grid = (*grid, 1, 1)[:3]
        if not _hooked():
            kernel.run(*grid, self.stream(device), kernel.function, kernel.packed_metadata, None, None, None, *raw,
                       *constexprs)
        else:
            kernel[grid](*args, *constexprs)

    def _first_launch(self, grid, args, meta):
        """Launch through Triton, with one pipeline stage fewer while the GPU's shared memory is too small (module
        notes); returns the compiled kernel and the keyword arguments it was launched with."""
        while True:
            try:
                return self.fn[grid](*args, **meta), meta
            except OutOfResources as error:
                stages = meta.get("num_stages", 3)  # Triton's default
                if error.name != "shared memory" or stages <= 1:
                    raise
                meta = meta | {"num_stages": stages - 1}


def cached(fn):
    """Decorator: ``fn`` (a ``@triton.jit`` function) with a per-signature table of compiled kernels, launched as
    ``fn[grid](*args, **meta)`` with the runtime arguments by position and constexprs and launch options by
    keyword. Under the interpreter, ``fn`` itself."""
    return _Cached(fn) if isinstance(fn, JITFunction) else fn
