"""Triton kernels. Each module holds one kernel and the PyTorch glue around it."""
