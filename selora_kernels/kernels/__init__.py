"""Triton kernels of selora_kernels: pure functions of tensors and sizes (no torch.library, no nn).

Importing this package does not import triton; the kernel modules do.
"""
