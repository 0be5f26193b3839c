"""Triton kernels for badam_kernels (installed as badam_kernels.triton_ops).

Run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported.
"""

from badam_kernels.triton_ops.fused_adamw import fused_adamw_triton
from badam_kernels.triton_ops.grad_norm import grad_norm_triton
from badam_kernels.triton_ops.sparse_adam import sparse_adam_triton

__all__ = ["fused_adamw_triton", "grad_norm_triton", "sparse_adam_triton"]
