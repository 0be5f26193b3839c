"""badam_kernels: fused kernels and a block-coordinate AdamW optimizer for BAdam fine-tuning."""

from badam_kernels.badam_compat import BlockOptimizer, BlockOptimizerRatio
from badam_kernels.compile import compile_layers
from badam_kernels.ops import available_backends, fused_adamw_, grad_norm, sparse_adam_
from badam_kernels.optim import BlockAdamW

__all__ = [
    "BlockAdamW",
    "BlockOptimizer",
    "BlockOptimizerRatio",
    "available_backends",
    "compile_layers",
    "fused_adamw_",
    "grad_norm",
    "sparse_adam_",
]
__version__ = "0.1.0"
