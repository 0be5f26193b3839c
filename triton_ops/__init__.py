"""Triton kernels for badam_kernels (installed as badam_kernels.triton_ops)."""
