"""Kernel launches with less host time.

``kernel[grid](*args, **meta)`` costs 30-60 µs of Python per launch on an H100 host (argument binding and
specialization, the cache key, launch metadata): longer than several of our kernels run at training shapes,
where the GPU then waits on the host. :func:`cached` wraps a ``@triton.jit`` function so that
``kernel[grid](*args, **meta)`` launches through Triton the first time it sees a *signature*, keeps the compiled
kernel, and afterwards calls its launcher directly (FlagGems' ``libentry`` works the same way).

The signature holds everything Triton specializes on, and more: the exact value of every non-tensor argument
(Triton looks at integers equal to 1 or divisible by 16), each tensor's dtype and address modulo 16, the keyword
arguments (constexprs, ``num_warps``, ``num_stages``) and the current device; a hit therefore reuses the kernel
Triton itself would pick. Repeated shapes (training steps, batches of images) hit; a new shape costs one
Triton launch, and the table is emptied past :data:`MAX_SIGNATURES`. Triton's launch hooks (profilers) are called
as Triton calls them. Under ``TRITON_INTERPRET=1`` the kernels are not wrapped.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import JITFunction, driver

MAX_SIGNATURES = 1024


class _Cached:
    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self._launch(grid, args, meta)

    def _launch(self, grid, args, meta):
        device = driver.active.get_current_device()
        key = (device, *[(arg.dtype, arg.data_ptr() % 16) if isinstance(arg, torch.Tensor) else arg for arg in args],
               *meta.items())
        entry = self.compiled.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **meta)
            if hasattr(kernel, "packed_metadata"):  # a compiled kernel (not under the interpreter)
                if len(self.compiled) >= MAX_SIGNATURES:
                    self.compiled.clear()
                names = self.fn.arg_names[len(args):]  # the parameters given by keyword, in signature order
                self.compiled[key] = kernel, tuple(meta[name] for name in names)
            return
        kernel, constexprs = entry
        args = (*args, *constexprs)
        stream = driver.active.get_current_stream(device)
        size = (*grid, 1, 1)  # what Triton's own launch passes, hooks (profilers) included
        kernel.run(size[0], size[1], size[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *args), knobs.runtime.launch_enter_hook,
                   knobs.runtime.launch_exit_hook, *args)


def cached(fn):
    """Decorator: ``fn`` (a ``@triton.jit`` function) with a per-signature table of compiled kernels, launched as
    ``fn[grid](*args, **meta)`` with the runtime arguments by position and constexprs and launch options by
    keyword. Under the interpreter ``fn`` itself."""
    return _Cached(fn) if isinstance(fn, JITFunction) else fn
