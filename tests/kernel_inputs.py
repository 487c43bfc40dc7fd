"""Inputs shared by the kernel tests: the device (CUDA, else the CPU under TRITON_INTERPRET=1), seeded random
tensors on it, and the mask kinds every kernel must handle."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK_KINDS = ["bool", "additive", "padding", "fully_masked_row"]


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def make_mask(kind: str, b: int, h: int, n: int) -> torch.Tensor:
    """A ``(b|1, h|1, n, n)`` mask: random boolean, random additive, key padding (second sequence 20 long), or
    all-True but row 3 fully masked."""
    if kind == "bool":
        return rand(b, 1, n, n, seed=7) > -0.3
    if kind == "additive":
        return rand(1, h, n, n, seed=8)
    if kind == "padding":
        return (torch.arange(n, device=DEVICE) < torch.tensor([n, 20], device=DEVICE)[:, None])[:, None, None, :]
    mask = torch.ones(b, h, n, n, dtype=torch.bool, device=DEVICE)
    mask[:, :, 3] = False
    return mask
