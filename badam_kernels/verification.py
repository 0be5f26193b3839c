"""How a fused-AdamW result is judged, shared by the test suite and `python -m badam_kernels.check`:
random optimizer states, the fp64 oracle step and the tolerance checks (which raise AssertionError).

How results are judged (per element, against reference.py computed in fp64 on the same inputs):
- fp32 quantities (exp_avg, exp_avg_sq, fp32 masters, decoded remainder masters, fp32 params) are
  within FP32_TOL_ULPS units of fp32 roundoff of the magnitude of the terms that produced them
  (e.g. |beta1 * m| + |(1 - beta1) * g| for m). A kernel does a dozen fp32 roundings per element
  and receives fp32-rounded constants, so a few ulps of the term size is what a correct kernel
  can be off by; relative to the result alone the bound would fail under cancellation.
- bf16/fp16 params are one of the two dtype neighbours of the fp64 weight (widened by the fp32
  tolerance), i.e. within one ulp of the oracle rounded; and, for round-to-nearest modes, their
  error is at most twice that of the "torch" backend (fp32 reference) on the same inputs plus the
  fp32 tolerance (flash-attention's criterion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from badam_kernels import ops, reference

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
# (param dtype, master mode, stochastic rounding): every combination fused_adamw_ accepts.
ALL_WEIGHT_MODES = [
    (torch.float32, "none", False),
    (torch.bfloat16, "none", False),
    (torch.bfloat16, "none", True),
    (torch.bfloat16, "fp32", False),
    (torch.bfloat16, "remainder", False),
    (torch.float16, "none", False),
    (torch.float16, "fp32", False),
]
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ALL_WEIGHT_MODE_IDS = [f"{_SHORT[p]}-{mode}{'-sr' if sr else ''}" for p, mode, sr in ALL_WEIGHT_MODES]
FP32_UNIT_ROUNDOFF = 2.0**-24
FP32_TOL_ULPS = 16


@dataclass
class AdamState:
    """The tensors one fused_adamw_ call updates in place (masters is [] for mode "none")."""

    params: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    master_weights: str
    masters: list[torch.Tensor] = field(default_factory=list)

    def map(self, fn) -> AdamState:
        return AdamState(
            [fn(t) for t in self.params], [fn(t) for t in self.exp_avgs],
            [fn(t) for t in self.exp_avg_sqs], self.master_weights, [fn(t) for t in self.masters],
        )  # fmt: skip

    def clone(self) -> AdamState:
        return self.map(torch.clone)

    def to(self, device: torch.device | str) -> AdamState:
        return self.map(lambda t: t.to(device))

    def weights(self) -> list[torch.Tensor]:
        """The fp32 weight each param stands for under its master mode."""
        if self.master_weights == "fp32":
            return list(self.masters)
        if self.master_weights == "remainder":
            return [reference.remainder_decode(p, r) for p, r in zip(self.params, self.masters)]
        return [p.float() for p in self.params]

    def all_tensors(self) -> list[torch.Tensor]:
        return self.params + self.exp_avgs + self.exp_avg_sqs + self.masters


def random_params(numel: int, dtype: torch.dtype, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(numel, generator=gen, dtype=torch.float64) * sigma).to(dtype)


def random_grads(sizes: list[int], dtype: torch.dtype, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Gradients whose magnitudes spread log-uniformly over 1e-3..1, as in real fine-tuning."""
    grads = []
    for n in sizes:
        magnitude = 10.0 ** (-3.0 * torch.rand(n, generator=gen, dtype=torch.float64))
        grads.append((torch.randn(n, generator=gen, dtype=torch.float64) * magnitude).to(dtype).to(device))
    return grads


def make_state(
    sizes: list[int], param_dtype: torch.dtype, master_weights: str, gen: torch.Generator, device
) -> AdamState:
    """A fresh block: params ~ N(0, 0.02) and N(0, 1) alternately, zero Adam state, masters as a
    newly activated block has them (fp32 copy of the param, or remainder 0)."""
    params = [random_params(n, param_dtype, 0.02 if i % 2 == 0 else 1.0, gen) for i, n in enumerate(sizes)]
    masters = {
        "none": [],
        "fp32": [p.float() for p in params],
        "remainder": [torch.zeros(n, dtype=torch.int16) for n in sizes],
    }[master_weights]
    zeros = [torch.zeros(n) for n in sizes]
    state = AdamState(params, zeros, [z.clone() for z in zeros], master_weights, masters)
    return state.to(device)


def apply_step(state: AdamState, grads: list[torch.Tensor], *, backend: str, step: int, **kwargs) -> None:
    """One badam_kernels.fused_adamw_ call on `state` (HYPER unless overridden in kwargs)."""
    ops.fused_adamw_(
        state.params, grads, state.exp_avgs, state.exp_avg_sqs, step=step,
        master_weights=state.master_weights, masters=state.masters or None, backend=backend,
        **{**HYPER, **kwargs},
    )  # fmt: skip


@dataclass
class OracleStep:
    """The fp64 oracle's result of one step with absolute tolerances for each element."""

    weights: list[torch.Tensor]  # fp64, not rounded
    weight_tols: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_tols: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    exp_avg_sq_tols: list[torch.Tensor]


def oracle_step(
    state: AdamState, grads: list[torch.Tensor], *, step: int, weight_decay: float,
    grad_mul: torch.Tensor | None = None, **hyper,
) -> OracleStep:  # fmt: skip
    """reference.fused_adamw_reference in fp64 on `state`'s weights (taken as fp64 "params" in
    mode "none" so the new weight comes back unrounded). Does not modify `state`."""
    h = {**HYPER, **hyper}
    cpu = state.to("cpu")
    grads = [g.cpu() for g in grads]
    grad_mul = None if grad_mul is None else grad_mul.cpu()
    weights = [w.double() for w in cpu.weights()]
    new_w, new_m, new_v, _ = reference.fused_adamw_reference(
        weights, grads, cpu.exp_avgs, cpu.exp_avg_sqs, None, weight_decay=weight_decay, step=step,
        master_weights="none", stochastic_rounding=False, seed=0, grad_mul=grad_mul, found_inf=None,
        compute_dtype=torch.float64, **h,
    )  # fmt: skip

    tol = FP32_TOL_ULPS * FP32_UNIT_ROUNDOFF
    b1, b2 = h["beta1"], h["beta2"]
    decay = 1.0 - h["lr"] * weight_decay
    step_size = h["lr"] / (1.0 - b1**step)
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    weight_tols, m_tols, v_tols = [], [], []
    for w, g, m, v, v_new in zip(weights, grads, cpu.exp_avgs, cpu.exp_avg_sqs, new_v):
        g = g.double() * (1.0 if grad_mul is None else grad_mul.double())
        m_scale = b1 * m.double().abs() + (1 - b1) * g.abs()
        v_scale = b2 * v.double() + (1 - b2) * g * g
        denom = v_new.double().sqrt() / bc2_sqrt + h["eps"]
        w_scale = w.abs() * decay + step_size * m_scale / denom
        weight_tols.append(tol * w_scale)
        m_tols.append(tol * m_scale)
        v_tols.append(tol * v_scale)
    return OracleStep(new_w, weight_tols, new_m, m_tols, new_v, v_tols)


def assert_fp32_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> None:
    """|actual - expected| <= tol elementwise; NaN anywhere in actual fails."""
    err = (actual.double() - expected.double()).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(torch.nan_to_num(err - tol, nan=math.inf).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {actual.numel()} elements outside {FP32_TOL_ULPS} fp32 ulps "
            f"of their scale; worst at index {i}: got {actual[i].item()!r}, expected "
            f"{expected[i].item()!r}, tolerance {tol[i].item():.3g}"
        )


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = x.to(dtype)  # one of the two dtype neighbours of x
    return torch.where(q.double() > x, torch.nextafter(q, torch.full_like(q, -math.inf)), q)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = x.to(dtype)
    return torch.where(q.double() < x, torch.nextafter(q, torch.full_like(q, math.inf)), q)


def assert_rounded_from(
    name: str, actual: torch.Tensor, exact: torch.Tensor, tol: torch.Tensor, baseline: torch.Tensor | None
) -> None:
    """`actual` (bf16/fp16) is a dtype neighbour of `exact` (fp64) widened by `tol`; with a
    `baseline` (the fp32 torch backend's result), its error is also at most twice the baseline's."""
    a = actual.double()
    low = _round_down(exact - tol, actual.dtype).double()
    high = _round_up(exact + tol, actual.dtype).double()
    bad = ~((a >= low) & (a <= high))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {actual.numel()} elements are not a {actual.dtype} neighbour "
            f"of the fp64 oracle; first at index {i}: got {a[i].item()!r}, oracle {exact[i].item()!r}, "
            f"allowed [{low[i].item()!r}, {high[i].item()!r}]"
        )
    if baseline is None:
        return
    err = (a - exact).abs()
    allowed = 2 * (baseline.double() - exact).abs() + tol
    bad = ~(err <= allowed)
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {actual.numel()} elements have more than twice the error of "
            f"the fp32 torch backend; worst at index {i}: got {a[i].item()!r}, torch backend "
            f"{baseline[i].item()!r}, oracle {exact[i].item()!r}"
        )


def check_step(
    after: AdamState, expected: OracleStep, baseline: AdamState | None, *, stochastic_rounding: bool = False
) -> None:
    """Compare a kernel's state after one step with the oracle (and the torch backend's state)."""
    after = after.to("cpu")
    baseline = None if baseline is None or stochastic_rounding else baseline.to("cpu")
    weights = after.weights()
    for i, p in enumerate(after.params):
        assert_fp32_close(f"exp_avgs[{i}]", after.exp_avgs[i], expected.exp_avgs[i], expected.exp_avg_tols[i])
        assert_fp32_close(
            f"exp_avg_sqs[{i}]", after.exp_avg_sqs[i], expected.exp_avg_sqs[i], expected.exp_avg_sq_tols[i]
        )
        w_exact, w_tol = expected.weights[i], expected.weight_tols[i]
        if p.dtype == torch.float32:
            assert_fp32_close(f"params[{i}]", p, w_exact, w_tol)
            continue
        if after.master_weights != "none":
            assert_fp32_close(f"{after.master_weights} master[{i}]", weights[i], w_exact, w_tol)
        if after.master_weights == "fp32":
            rne = after.masters[i].to(p.dtype)
            if not torch.equal(p.view(torch.int16), rne.view(torch.int16)):
                raise AssertionError(f"params[{i}] is not the round-to-nearest-even copy of its fp32 master")
        base = None if baseline is None else baseline.params[i]
        assert_rounded_from(f"params[{i}] ({p.dtype})", p, w_exact, w_tol, base)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as integers, so NaN, -0.0 and payloads compare exactly."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
