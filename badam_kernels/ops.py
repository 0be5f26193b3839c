"""The public ops: `fused_adamw_` and `grad_norm`, their torch.library registrations and the
choice of backend.

Backends, each a separate torch.library op with the same signature:
  "cpu"    badam_kernels::fused_adamw_ (C++ extension, CPU key)
  "cuda"   badam_kernels::fused_adamw_ (C++/CUDA extension, CUDA key)
  "triton" badam_kernels::fused_adamw_triton_ (Triton; CPU tensors need TRITON_INTERPRET=1)
  "torch"  badam_kernels::fused_adamw_torch_ (reference.py in fp32; any device)
The compiled extension is optional: without it the "torch" and "triton" backends still work.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import numbers
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from badam_kernels import reference

log = logging.getLogger("badam_kernels")

try:
    from badam_kernels import _C  # noqa: F401  (registers the C++ ops on import)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # a pure-Python install: torch and triton backends only
    EXTENSION_ERROR = str(exc)
    log.info("badam_kernels: compiled extension not available (%s)", exc)

try:  # written by setup.py at build time, one per Python: whether the CUDA kernels were built, and why not
    _build_info = importlib.import_module(
        "badam_kernels._build_info_" + sys.implementation.cache_tag.replace("-", "_")
    )
except ImportError:  # not built by setup.py (CMake, or not built at all)
    _build_info = None

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
MASTER_MODES = ("none", "fp32", "remainder")
PARAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BUILD_HINT = (
    "build the extension with `pip install --no-build-isolation -e .` "
    "(CUDA kernels need a CUDA build of torch and a CUDA toolkit of the same major version; "
    "`pip install -v` shows the build's decision)"
)


def _has_cpp_kernel(op: str, key: str) -> bool:
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"badam_kernels::{op}", key)


@functools.cache
def triton_installed() -> bool:
    """Cached: find_spec walks sys.path, far too slow to repeat at every optimizer step."""
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under its interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def missing_kernels_reason(backend: str) -> str:
    """Why the compiled `backend` ("cpu" or "cuda") has no kernels in this installation."""
    if EXTENSION_ERROR is not None:
        return f"the compiled extension did not load: {EXTENSION_ERROR}"
    if backend == "cuda" and _build_info is not None and not _build_info.CUDA_KERNELS:
        return _build_info.CUDA_REASON  # recorded by setup.py, e.g. no toolkit of torch's CUDA version
    return f"the extension was built without {backend.upper()} kernels"


@functools.cache
def _warn_missing_cuda_kernels(reason: str) -> None:
    """Once per process and reason: a CUDA torch running without our CUDA kernels is slower than it
    should be, and the reason (recorded at build time) is the fix."""
    warnings.warn(f"badam_kernels: the 'cuda' backend is not available: {reason}", stacklevel=3)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on tensors of `device`, fastest first (the "auto" order).

    For a CUDA device on a CUDA build of torch whose extension lacks the CUDA kernels, warns once
    with the reason recorded when the extension was built (e.g. no CUDA toolkit of torch's version).
    """
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if _has_cpp_kernel("fused_adamw_", "CUDA"):
            found.append("cuda")
        elif torch.version.cuda is not None and (_build_info is None or _build_info.CUDA_WARN):
            _warn_missing_cuda_kernels(missing_kernels_reason("cuda"))
    if device.type == "cpu" and _has_cpp_kernel("fused_adamw_", "CPU"):
        found.append("cpu")
    if triton_usable(device):
        found.append("triton")
    found.append("torch")
    return found


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device`; fail clearly if one asked for is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    usable = available_backends(device)
    if backend == "auto":
        # The triton interpreter is a correctness tool, far slower than the reference on CPU.
        return next(b for b in usable if not (b == "triton" and device.type == "cpu"))
    if backend in usable:
        return backend
    if backend in ("cpu", "cuda"):
        if backend != device.type:
            raise ValueError(f"backend {backend!r} cannot run tensors on {device}")
        raise RuntimeError(
            f"backend {backend!r} is not available ({missing_kernels_reason(backend)}); {_BUILD_HINT}"
        )
    if not triton_installed():
        raise RuntimeError("backend 'triton' needs the triton package: `pip install triton`")
    raise RuntimeError(
        f"backend 'triton' cannot run tensors on {device}: CPU tensors need TRITON_INTERPRET=1 "
        "set before triton is imported"
    )


# ---- validation -------------------------------------------------------------------------


def _check_scalar(name: str, value, low: float, high: float, *, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    above = value >= high if high_open else value > high
    if math.isnan(value) or value < low or above:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return value


def _check_flag_tensor(name: str, t, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 0-dim fp32 tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a 0-dim fp32 tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the params are on {device}")


def _check_list(name: str, tensors, n: int) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) != n:
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {n}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return list(tensors)


def _check_param_lists(params, grads, exp_avgs, exp_avg_sqs) -> tuple[list[torch.Tensor], ...]:
    """The per-param lists of an update op: lists of tensors, as many as params."""
    if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    n = len(params)
    named = (("params", params), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs))
    return tuple(_check_list(name, tensors, n) for name, tensors in named)


def _check_tensor(
    name: str, i: int, t: torch.Tensor, numel: int, device: torch.device, dtypes, *, of: str = "params"
) -> None:
    """dtype, numel (that of `of`[i]), device and contiguity of `name`[i]."""
    if t.dtype not in dtypes:
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
    if t.numel() != numel:
        raise ValueError(f"{name}[{i}] has {t.numel()} elements but {of}[{i}] has {numel}")
    if t.device != device:
        raise ValueError(f"{name}[{i}] is on {t.device} but params[0] is on {device}")
    if not t.is_contiguous():
        if name == "grads":  # only read: a contiguous copy serves as well
            raise ValueError(f"grads[{i}] is not contiguous; pass grads[{i}].contiguous()")
        raise ValueError(
            f"{name}[{i}] is not contiguous. It is updated in place, so a copy made by .contiguous() "
            "would take the update and the tensor itself would not change: make the tensor itself "
            "contiguous (allocate it contiguous; for a parameter, param.data = param.data.contiguous())"
        )


def _check_masters(master_weights: str, masters, n: int) -> list[torch.Tensor]:
    """The validated list of masters for the master mode (empty for "none")."""
    if master_weights not in MASTER_MODES:
        raise ValueError(f"master_weights must be one of {MASTER_MODES}, got {master_weights!r}")
    if master_weights == "none":
        if masters:
            raise ValueError("masters were given but master_weights='none'")
        return []
    if masters is None:
        raise ValueError(f"master_weights={master_weights!r} needs masters (one per param)")
    return _check_list("masters", masters, n)


def _check_step_and_hyperparameters(step, lr, beta1, beta2, eps) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the first step is 1), got {step}")
    _check_scalar("lr", lr, 0.0, math.inf)
    _check_scalar("beta1", beta1, 0.0, 1.0)
    _check_scalar("beta2", beta2, 0.0, 1.0)
    _check_scalar("eps", eps, 0.0, math.inf)


def _check_master_fits(i: int, p: torch.Tensor, master_weights: str) -> None:
    if master_weights == "remainder" and p.dtype != torch.bfloat16:
        raise TypeError(f"master_weights='remainder' needs bf16 params, params[{i}] is {p.dtype}")
    if master_weights == "fp32" and p.dtype == torch.float32:
        raise TypeError(
            f"params[{i}] is fp32 and is its own master; use master_weights='none' for fp32 params"
        )


def validate_adamw_args(
    params, grads, exp_avgs, exp_avg_sqs, masters, *, lr, beta1, beta2, eps, weight_decay, step,
    master_weights, stochastic_rounding, seed, grad_mul, found_inf,
):  # fmt: skip
    """Raise a ValueError/TypeError naming the offending argument and index; return the lists."""
    params, grads, exp_avgs, exp_avg_sqs = _check_param_lists(params, grads, exp_avgs, exp_avg_sqs)
    n = len(params)
    masters = _check_masters(master_weights, masters, n)
    _check_step_and_hyperparameters(step, lr, beta1, beta2, eps)
    _check_scalar("weight_decay", weight_decay, 0.0, math.inf)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}")
    if n == 0:
        return params, grads, exp_avgs, exp_avg_sqs, masters
    device = params[0].device
    master_dtype = {"fp32": (torch.float32,), "remainder": (torch.int16,)}.get(master_weights)
    for i, p in enumerate(params):
        _check_tensor("params", i, p, p.numel(), device, PARAM_DTYPES)
        _check_tensor("grads", i, grads[i], p.numel(), device, PARAM_DTYPES)
        _check_tensor("exp_avgs", i, exp_avgs[i], p.numel(), device, (torch.float32,))
        _check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], p.numel(), device, (torch.float32,))
        _check_master_fits(i, p, master_weights)
        if stochastic_rounding and p.dtype != torch.bfloat16:
            raise TypeError(f"stochastic_rounding needs bf16 params, params[{i}] is {p.dtype}")
        if master_dtype is not None:
            _check_tensor("masters", i, masters[i], p.numel(), device, master_dtype)
    if stochastic_rounding and master_weights != "none":
        raise ValueError("stochastic_rounding applies only to master_weights='none'")
    _check_flag_tensor("grad_mul", grad_mul, device)
    _check_flag_tensor("found_inf", found_inf, device)
    return params, grads, exp_avgs, exp_avg_sqs, masters


def validate_sparse_adam_args(
    params, grads, exp_avgs, exp_avg_sqs, masters, indices, *, lr, beta1, beta2, eps, step,
    master_weights, grad_mul,
):  # fmt: skip
    """sparse_adam_'s arguments: raise a ValueError/TypeError naming the offending argument and
    index; return the lists. Index values are not looked at (see _check_index_range)."""
    params, grads, exp_avgs, exp_avg_sqs = _check_param_lists(params, grads, exp_avgs, exp_avg_sqs)
    n = len(params)
    indices = [] if indices is None else _check_list("indices", indices, n)
    masters = _check_masters(master_weights, masters, n)
    _check_step_and_hyperparameters(step, lr, beta1, beta2, eps)
    if n == 0:
        return params, grads, exp_avgs, exp_avg_sqs, masters, indices
    device = params[0].device
    master_dtype = {"fp32": (torch.float32,), "remainder": (torch.int16,)}.get(master_weights)
    of = "indices" if indices else "params"
    for i, p in enumerate(params):
        _check_tensor("params", i, p, p.numel(), device, PARAM_DTYPES)
        numel = p.numel()
        if indices:
            numel = indices[i].numel()
            _check_tensor("indices", i, indices[i], numel, device, (torch.int32, torch.int64), of=of)
        _check_tensor("grads", i, grads[i], numel, device, PARAM_DTYPES, of=of)
        _check_tensor("exp_avgs", i, exp_avgs[i], numel, device, (torch.float32,), of=of)
        _check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], numel, device, (torch.float32,), of=of)
        _check_master_fits(i, p, master_weights)
        if master_dtype is not None:
            _check_tensor("masters", i, masters[i], numel, device, master_dtype, of=of)
    _check_flag_tensor("grad_mul", grad_mul, device)
    return params, grads, exp_avgs, exp_avg_sqs, masters, indices


def _check_index_range(params, indices) -> None:
    """IndexError for an index outside its param, before anything is written. For CPU tensors
    only: on a GPU reading the range back costs a host sync (the CUDA kernel traps instead)."""
    for i, (p, index) in enumerate(zip(params, indices)):
        if index.numel() == 0:
            continue
        low, high = torch.aminmax(index)
        if low < 0 or high >= p.numel():
            raise IndexError(
                f"indices[{i}] holds values in [{int(low)}, {int(high)}] but params[{i}] has "
                f"{p.numel()} elements"
            )


# ---- the "torch" and "triton" backends as torch.library ops ------------------------------

_ADAMW_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "masters")


def _copy_into(destinations, results) -> None:
    """Write a reference result (lists of new tensors) into the op's mutated argument lists."""
    for dst_list, src_list in zip(destinations, results):
        for dst, src in zip(dst_list, src_list):
            dst.copy_(src)


@torch.library.custom_op("badam_kernels::fused_adamw_torch_", mutates_args=_ADAMW_MUTATES)
def _fused_adamw_torch(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor], lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, step: int, master_weights: str,
    stochastic_rounding: bool, seed: int, grad_mul: torch.Tensor | None, found_inf: torch.Tensor | None,
) -> None:  # fmt: skip
    outs = reference.fused_adamw_reference(
        params, grads, exp_avgs, exp_avg_sqs, masters, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, master_weights=master_weights,
        stochastic_rounding=stochastic_rounding, seed=seed, grad_mul=grad_mul, found_inf=found_inf,
    )  # fmt: skip
    _copy_into((params, exp_avgs, exp_avg_sqs, masters), outs)


# The Triton launchers build int64 tables of data_ptr()s, which fake tensors cannot trace, so
# these are opaque custom ops (not torch.library.triton_op): torch.compile sees one op.
@torch.library.custom_op("badam_kernels::fused_adamw_triton_", mutates_args=_ADAMW_MUTATES)
def _fused_adamw_triton(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor], lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, step: int, master_weights: str,
    stochastic_rounding: bool, seed: int, grad_mul: torch.Tensor | None, found_inf: torch.Tensor | None,
) -> None:  # fmt: skip
    from badam_kernels.triton_ops import fused_adamw_triton

    fused_adamw_triton(
        params, grads, exp_avgs, exp_avg_sqs, masters, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, master_weights=master_weights,
        stochastic_rounding=stochastic_rounding, seed=seed, grad_mul=grad_mul, found_inf=found_inf,
    )  # fmt: skip


@torch.library.custom_op("badam_kernels::grad_norm_torch", mutates_args=())
def _grad_norm_torch(tensors: list[torch.Tensor]) -> torch.Tensor:
    return reference.grad_norm_reference(tensors)


@torch.library.custom_op("badam_kernels::grad_norm_triton", mutates_args=())
def _grad_norm_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    from badam_kernels.triton_ops import grad_norm_triton

    return grad_norm_triton(tensors)


def _grad_norm_fake(tensors):
    return tensors[0].new_empty((), dtype=torch.float32)


for _name in ("grad_norm_torch", "grad_norm_triton"):
    torch.library.register_fake(f"badam_kernels::{_name}")(_grad_norm_fake)
if EXTENSION_ERROR is None:
    torch.library.register_fake("badam_kernels::grad_norm")(_grad_norm_fake)

    @torch.library.register_fake("badam_kernels::fused_adamw_")
    def _fused_adamw_fake(*args, **kwargs) -> None:
        return None


@_fused_adamw_torch.register_fake
def _fused_adamw_torch_fake(*args, **kwargs) -> None:
    return None


_fused_adamw_triton.register_fake(_fused_adamw_torch_fake)

_FUSED_ADAMW_OPS = {
    "cpu": lambda: torch.ops.badam_kernels.fused_adamw_,
    "cuda": lambda: torch.ops.badam_kernels.fused_adamw_,
    "triton": lambda: torch.ops.badam_kernels.fused_adamw_triton_,
    "torch": lambda: torch.ops.badam_kernels.fused_adamw_torch_,
}
_GRAD_NORM_OPS = {
    "cpu": lambda: torch.ops.badam_kernels.grad_norm,
    "cuda": lambda: torch.ops.badam_kernels.grad_norm,
    "triton": lambda: torch.ops.badam_kernels.grad_norm_triton,
    "torch": lambda: torch.ops.badam_kernels.grad_norm_torch,
}


# sparse_adam_: SparseAdam on selected entries (badam's ratio mode); same backend layout.
@torch.library.custom_op("badam_kernels::sparse_adam_torch_", mutates_args=_ADAMW_MUTATES)
def _sparse_adam_torch(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor], indices: list[torch.Tensor], lr: float,
    beta1: float, beta2: float, eps: float, step: int, master_weights: str, grad_mul: torch.Tensor | None,
) -> None:  # fmt: skip
    outs = reference.sparse_adam_reference(
        params, grads, exp_avgs, exp_avg_sqs, masters, indices, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        step=step, master_weights=master_weights, grad_mul=grad_mul,
    )  # fmt: skip
    _copy_into((params, exp_avgs, exp_avg_sqs, masters), outs)


@torch.library.custom_op("badam_kernels::sparse_adam_triton_", mutates_args=_ADAMW_MUTATES)
def _sparse_adam_triton(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], masters: list[torch.Tensor], indices: list[torch.Tensor], lr: float,
    beta1: float, beta2: float, eps: float, step: int, master_weights: str, grad_mul: torch.Tensor | None,
) -> None:  # fmt: skip
    from badam_kernels.triton_ops import sparse_adam_triton

    sparse_adam_triton(
        params, grads, exp_avgs, exp_avg_sqs, masters, indices, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        step=step, master_weights=master_weights, grad_mul=grad_mul,
    )  # fmt: skip


@_sparse_adam_torch.register_fake
def _sparse_adam_fake(*args, **kwargs) -> None:
    return None


_sparse_adam_triton.register_fake(_sparse_adam_fake)
if EXTENSION_ERROR is None:
    torch.library.register_fake("badam_kernels::sparse_adam_")(_sparse_adam_fake)

_SPARSE_ADAM_OPS = {
    "cpu": lambda: torch.ops.badam_kernels.sparse_adam_,
    "cuda": lambda: torch.ops.badam_kernels.sparse_adam_,
    "triton": lambda: torch.ops.badam_kernels.sparse_adam_triton_,
    "torch": lambda: torch.ops.badam_kernels.sparse_adam_torch_,
}


# ---- public API --------------------------------------------------------------------------


def fused_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int,
    master_weights: str = "none",
    masters: Sequence[torch.Tensor] | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    grad_mul: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One AdamW step (torch.optim.AdamW semantics, amsgrad off) over a list of tensors, in place.

    Args:
        params: (n_i,) bf16/fp16/fp32 tensors of any shape, contiguous; updated in place.
        grads: same numel as params; bf16, fp16 or fp32.
        exp_avgs, exp_avg_sqs: fp32, same numel; updated in place.
        lr, beta1, beta2, eps, weight_decay: AdamW hyperparameters (decoupled weight decay).
        step: the step number of this update, >= 1 (drives bias correction).
        master_weights: "none" (the param is the weight), "fp32" (fp32 `masters` hold the weight,
            params get its round-to-nearest-even copy) or "remainder" (bf16 params only: int16
            `masters` hold the low 16 bits, so param + remainder is the exact fp32 weight).
        masters: one tensor per param for "fp32" (fp32) or "remainder" (int16, zeros for a new
            block); None for "none".
        stochastic_rounding: with master_weights="none" and bf16 params, round the result to
            one of its two bf16 neighbours, unbiased, deterministic in (seed, step, index).
        grad_mul: optional 0-dim fp32 tensor on the params' device multiplying every gradient
            (loss-scale unscaling, clipping), read on the device.
        found_inf: optional 0-dim fp32 tensor; if non-zero nothing is written (GradScaler skip),
            decided on the device without a host sync.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Example:
        >>> p = torch.randn(10, dtype=torch.bfloat16); g = torch.randn(10, dtype=torch.bfloat16)
        >>> m, v, r = torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.int16)
        >>> fused_adamw_([p], [g], [m], [v], lr=1e-3, step=1, master_weights="remainder", masters=[r])
    """
    params, grads, exp_avgs, exp_avg_sqs, masters = validate_adamw_args(
        params, grads, exp_avgs, exp_avg_sqs, masters, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, master_weights=master_weights,
        stochastic_rounding=stochastic_rounding, seed=seed, grad_mul=grad_mul, found_inf=found_inf,
    )  # fmt: skip
    if not params:
        resolve_backend(backend, torch.device("cpu"))  # still reject an unknown backend name
        return
    op = _FUSED_ADAMW_OPS[resolve_backend(backend, params[0].device)]()
    with torch.no_grad():
        op(
            params, grads, exp_avgs, exp_avg_sqs, masters, float(lr), float(beta1), float(beta2),
            float(eps), float(weight_decay), int(step), master_weights, stochastic_rounding, int(seed),
            grad_mul, found_inf,
        )  # fmt: skip


def grad_norm(tensors: Sequence[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """L2 norm over every element of every tensor, as a 0-dim fp32 tensor on their device.

    Computed on the device without a host sync, so clipping can use
    `grad_mul = (max_norm / (norm + 1e-6)).clamp(max=1)`.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError("grad_norm needs at least one tensor")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a tensor, got {type(t).__name__}")
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}, expected bf16, fp16 or fp32")
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"tensors[{i}] is not contiguous; pass tensor.contiguous()")
    op = _GRAD_NORM_OPS[resolve_backend(backend, device)]()
    with torch.no_grad():
        return op(list(tensors))


def sparse_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    indices: Sequence[torch.Tensor] | None = None,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    step: int,
    master_weights: str = "none",
    masters: Sequence[torch.Tensor] | None = None,
    grad_mul: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One SparseAdam step on selected entries of a list of tensors, in place: the update of
    torch.optim.SparseAdam and of badam's BlockOptimizerRatio (eps added outside the bias
    correction, no weight decay), with fp32 state and the master modes of `fused_adamw_`.

    Per selected entry, in fp32 (csrc/adam_math.h, sparse_adam_update):
        m += (g - m) * (1 - beta1);  v += (g * g - v) * (1 - beta2)
        w -= lr * sqrt(1 - beta2**step) / (1 - beta1**step) * m / (sqrt(v) + eps)

    Args:
        params: bf16/fp16/fp32 contiguous tensors, updated in place. Without `indices`, each is
            the selected run itself (e.g. a slice `p.view(-1)[a:b]`); with `indices`, the whole
            parameter.
        grads: the selected entries' gradients, compact (n_i,) bf16/fp16/fp32.
        exp_avgs, exp_avg_sqs: (n_i,) fp32, updated in place.
        indices: None, or one (n_i,) int32/int64 tensor per param: entry k of grads[i] and of
            the state belongs to params[i].view(-1)[indices[i][k]]. Indices must be unique.
            Out-of-range values raise an IndexError for CPU tensors; on a GPU the CUDA kernel
            traps and the Triton kernel leaves them out (a range check there costs a host sync).
        lr, beta1, beta2, eps, step: SparseAdam's hyperparameters; step >= 1.
        master_weights, masters: as in `fused_adamw_` ("none", "fp32", "remainder"), with
            (n_i,) masters for the selected entries.
        grad_mul: optional 0-dim fp32 tensor multiplying every gradient (clipping), read on the
            device.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Example:
        >>> p = torch.randn(100, dtype=torch.bfloat16); idx = torch.tensor([3, 50, 97], dtype=torch.int32)
        >>> g = torch.randn(3, dtype=torch.bfloat16); m, v = torch.zeros(3), torch.zeros(3)
        >>> r = torch.zeros(3, dtype=torch.int16)
        >>> sparse_adam_([p], [g], [m], [v], indices=[idx], lr=1e-3, step=1,
        ...              master_weights="remainder", masters=[r])
    """
    params, grads, exp_avgs, exp_avg_sqs, masters, indices = validate_sparse_adam_args(
        params, grads, exp_avgs, exp_avg_sqs, masters, indices, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        step=step, master_weights=master_weights, grad_mul=grad_mul,
    )  # fmt: skip
    if not params:
        resolve_backend(backend, torch.device("cpu"))  # still reject an unknown backend name
        return
    resolved = resolve_backend(backend, params[0].device)
    if resolved != "cpu" and params[0].device.type == "cpu":  # the C++ CPU op checks them itself
        _check_index_range(params, indices)
    op = _SPARSE_ADAM_OPS[resolved]()
    with torch.no_grad():
        op(
            params, grads, exp_avgs, exp_avg_sqs, masters, indices, float(lr), float(beta1), float(beta2),
            float(eps), int(step), master_weights, grad_mul,
        )  # fmt: skip
