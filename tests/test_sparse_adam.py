"""sparse_adam_ (SparseAdam on selected entries, badam's ratio mode): every available backend bit
for bit against reference.py, the reference against torch.optim.SparseAdam, contiguous runs
against the indexed form, the master modes, bad input and opcheck.

Bit-exact comparisons are the contract here: every backend computes csrc/adam_math.h's
sparse_adam_update with IEEE-rounded fp32 operations in a fixed order.
"""

from __future__ import annotations

import math

import pytest
import torch

import badam_kernels
from badam_kernels import reference
from badam_kernels.verification import bits

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
SIZES = [0, 1, 3, 1023, 65537]
STEPS = 3
SPARSE_ADAM_OP = {
    "cpu": "sparse_adam_",
    "cuda": "sparse_adam_",
    "triton": "sparse_adam_triton_",
    "torch": "sparse_adam_torch_",
}

# (param dtype, grad dtype, master mode): each mode with the dtypes it allows.
ROWS = [
    (FP32, FP32, "none"),
    (FP32, BF16, "none"),
    (BF16, BF16, "none"),
    (BF16, BF16, "remainder"),
    (BF16, FP32, "remainder"),
    (BF16, BF16, "fp32"),
    (FP16, FP16, "none"),
    (FP16, FP16, "fp32"),
]
SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32", None: "runs", torch.int32: "int32", torch.int64: "int64"}
ROW_IDS = [f"{SHORT[p]}-grad_{SHORT[g]}-{mode}" for p, g, mode in ROWS]


class Selection:
    """Params with selected entries and the compact state one sparse_adam_ call updates. Without
    an index dtype the params are contiguous runs (slices of larger tensors, as the optimizer's
    adjacent masks give them); with one, whole tensors and sorted random indices."""

    def __init__(self, sizes, param_dtype, mode, index_dtype, gen, device):
        self.mode = mode
        self.bases, self.originals, self.params, self.indices = [], [], [], []
        for k, n in enumerate(sizes):
            total = 2 * n + 5
            base = (torch.randn(total, generator=gen, dtype=torch.float64) * (0.02 if k % 2 else 1.0)).to(
                param_dtype
            )
            self.bases.append(base.to(device))
            self.originals.append(base)
            if index_dtype is None:
                self.params.append(self.bases[-1][5 : 5 + n])  # a view: the update lands in the base
            else:
                index = torch.randperm(total, generator=gen)[:n].sort().values
                self.indices.append(index.to(index_dtype).to(device))
                self.params.append(self.bases[-1])
        self.exp_avgs = [torch.zeros(n, device=device) for n in sizes]
        self.exp_avg_sqs = [torch.zeros(n, device=device) for n in sizes]
        selected = [self.selected(i).to(device) for i in range(len(sizes))]
        self.masters = {
            "none": [],
            "fp32": [s.float() for s in selected],
            "remainder": [torch.zeros(n, dtype=torch.int16, device=device) for n in sizes],
        }[mode]

    def selected(self, i: int) -> torch.Tensor:
        return self.params[i] if not self.indices else self.params[i][self.indices[i].long()]

    def step(self, grads, *, backend, step, grad_mul=None) -> None:
        badam_kernels.sparse_adam_(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, indices=self.indices or None, step=step,
            master_weights=self.mode, masters=self.masters or None, grad_mul=grad_mul, backend=backend,
            **HYPER,
        )  # fmt: skip

    def expected_after(self, grads, *, step, grad_mul=None):
        """reference.sparse_adam_reference on copies: (params, exp_avgs, exp_avg_sqs, masters)."""
        return reference.sparse_adam_reference(
            [p.clone() for p in self.params], grads, self.exp_avgs, self.exp_avg_sqs, self.masters,
            self.indices, step=step, master_weights=self.mode, grad_mul=grad_mul, **HYPER,
        )  # fmt: skip

    def tensors(self):
        return self.bases, self.exp_avgs, self.exp_avg_sqs, self.masters


def random_grads(sizes, dtype, gen, device):
    """Gradients whose magnitudes spread log-uniformly over 1e-3..1, as in real fine-tuning."""
    out = []
    for n in sizes:
        magnitude = 10.0 ** (-3.0 * torch.rand(n, generator=gen, dtype=torch.float64))
        out.append((torch.randn(n, generator=gen, dtype=torch.float64) * magnitude).to(dtype).to(device))
    return out


def assert_bits_equal(name, actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    differ = bits(actual.reshape(-1)) != bits(expected.reshape(-1))
    if differ.any():
        i = int(differ.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {actual.numel()} elements differ from the reference; first at "
            f"{i}: got {actual.reshape(-1)[i].item()!r}, expected {expected.reshape(-1)[i].item()!r}"
        )


def run_against_reference(
    target, sizes, param_dtype, grad_dtype, mode, index_dtype, *, grad_mul=None, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    sel = Selection(sizes, param_dtype, mode, index_dtype, gen, target.device)
    for step in range(1, STEPS + 1):
        grads = random_grads(sizes, grad_dtype, gen, target.device)
        expected_p, expected_m, expected_v, expected_masters = sel.expected_after(
            grads, step=step, grad_mul=grad_mul
        )
        sel.step(grads, backend=target.backend, step=step, grad_mul=grad_mul)
        for i in range(len(sizes)):
            assert_bits_equal(f"step {step} params[{i}]", sel.params[i], expected_p[i])
            assert_bits_equal(f"step {step} exp_avgs[{i}]", sel.exp_avgs[i], expected_m[i])
            assert_bits_equal(f"step {step} exp_avg_sqs[{i}]", sel.exp_avg_sqs[i], expected_v[i])
            if mode != "none":
                assert_bits_equal(f"step {step} masters[{i}]", sel.masters[i], expected_masters[i])
    return sel


@pytest.mark.parametrize("index_dtype", [None, torch.int32, torch.int64], ids=["runs", "int32", "int64"])
@pytest.mark.parametrize(("param_dtype", "grad_dtype", "mode"), ROWS, ids=ROW_IDS)
def test_backend_matches_reference_bit_for_bit(target, param_dtype, grad_dtype, mode, index_dtype):
    sel = run_against_reference(target, SIZES, param_dtype, grad_dtype, mode, index_dtype)
    for i, (base, original) in enumerate(zip(sel.bases, sel.originals)):
        outside = torch.ones(base.numel(), dtype=torch.bool)
        if index_dtype is None:
            outside[5 : 5 + SIZES[i]] = False
        else:
            outside[sel.indices[i].long().cpu()] = False
        assert_bits_equal(f"unselected entries of params[{i}]", base.cpu()[outside], original[outside])


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype", "mode", "index_dtype"),
    [(BF16, BF16, "remainder", torch.int32), (FP32, FP32, "none", None)],
    ids=["bf16-remainder-int32", "fp32-none-runs"],
)
def test_grad_mul(target, param_dtype, grad_dtype, mode, index_dtype):
    grad_mul = torch.tensor(0.37, device=target.device)
    run_against_reference(
        target, [3, 4099], param_dtype, grad_dtype, mode, index_dtype, grad_mul=grad_mul, seed=2
    )


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_cpu_instruction_set_gives_the_same_bits(isa, monkeypatch):
    """The SIMD paths (and their scalar tails) against the reference, each forced in turn."""
    if "cpu" not in badam_kernels.available_backends("cpu"):
        pytest.skip("the C++ CPU backend is not built")
    monkeypatch.setenv("BADAM_KERNELS_CPU_ISA", isa)
    probe = torch.zeros(1)
    try:
        badam_kernels.sparse_adam_(
            [probe], [probe], [probe.clone()], [probe.clone()], lr=0.0, step=1, backend="cpu"
        )
    except RuntimeError as exc:
        pytest.skip(f"this CPU cannot run the {isa} kernels: {exc}")
    target = type("Target", (), {"device": torch.device("cpu"), "backend": "cpu"})
    for param_dtype, grad_dtype, mode in [
        (BF16, BF16, "remainder"),
        (FP16, FP16, "fp32"),
        (FP32, FP32, "none"),
    ]:
        for index_dtype in (None, torch.int32):
            run_against_reference(target, [5, 1023, 4099], param_dtype, grad_dtype, mode, index_dtype, seed=4)


def test_wrapped_run_equals_its_indexed_form(target):
    """An adjacent mask that wraps around is two runs of one parameter (the low run first, as
    badam orders the state); the same step through sorted indices gives the same bits."""
    gen = torch.Generator().manual_seed(5)
    numel, offset, count = 1000, 900, 300
    wrap = offset + count - numel
    base = torch.randn(numel, generator=gen).to(BF16).to(target.device)
    index = torch.cat([torch.arange(wrap), torch.arange(offset, numel)]).int().to(target.device)
    state = [torch.zeros(count, device=target.device) for _ in range(2)] + [
        torch.zeros(count, dtype=torch.int16, device=target.device)
    ]
    runs = (base.clone(), [t.clone() for t in state])
    indexed = (base.clone(), [t.clone() for t in state])
    for step in range(1, STEPS + 1):
        grad = random_grads([count], BF16, gen, target.device)[0]
        p, (m, v, r) = runs
        views = [p[:wrap], p[offset:]]
        badam_kernels.sparse_adam_(
            views, [grad[:wrap], grad[wrap:]], [m[:wrap], m[wrap:]], [v[:wrap], v[wrap:]], step=step,
            master_weights="remainder", masters=[r[:wrap], r[wrap:]], backend=target.backend, **HYPER,
        )  # fmt: skip
        p, (m, v, r) = indexed
        badam_kernels.sparse_adam_(
            [p], [grad], [m], [v], indices=[index], step=step, master_weights="remainder", masters=[r],
            backend=target.backend, **HYPER,
        )  # fmt: skip
    for a, b in zip([runs[0], *runs[1]], [indexed[0], *indexed[1]]):
        assert_bits_equal("runs vs indices", a, b)
    assert not torch.equal(runs[0].cpu(), base.cpu())  # the step did something


def test_remainder_master_is_the_fp32_master_bit_for_bit(target):
    """bf16 param + int16 remainder decode to exactly the weight an fp32 master holds."""
    sizes = [7, 3001]
    gen = torch.Generator().manual_seed(6)
    fp32 = Selection(sizes, BF16, "fp32", torch.int32, gen, target.device)
    gen = torch.Generator().manual_seed(6)
    remainder = Selection(sizes, BF16, "remainder", torch.int32, gen, target.device)
    for step in range(1, 6):
        grads = random_grads(sizes, BF16, gen, target.device)
        fp32.step(grads, backend=target.backend, step=step)
        remainder.step(grads, backend=target.backend, step=step)
    for i in range(len(sizes)):
        decoded = reference.remainder_decode(remainder.selected(i).cpu(), remainder.masters[i].cpu())
        assert_bits_equal(f"masters[{i}]", decoded, fp32.masters[i])


def test_reference_is_torch_sparse_adam():
    """For fp32 params the reference is torch.optim.SparseAdam (badam's update) wherever torch's
    sqrt is correctly rounded; elsewhere (MKL's vector sqrt on some CPUs) one ulp of the
    denominator apart. Checked from a non-trivial state at step 5 (bias correction active)."""
    gen = torch.Generator().manual_seed(7)
    numel, count, step = 5000, 1700, 5
    index = torch.randperm(numel, generator=gen)[:count].sort().values
    weight = torch.randn(numel, generator=gen)
    exp_avg = torch.randn(count, generator=gen) * 1e-2
    exp_avg_sq = torch.rand(count, generator=gen) * 1e-4
    grad = torch.randn(count, generator=gen) * 1e-2

    param = weight.clone()
    optimizer = torch.optim.SparseAdam([param], **{"lr": HYPER["lr"], "betas": (0.9, 0.999), "eps": 1e-8})
    dense_m, dense_v = torch.zeros(numel), torch.zeros(numel)
    dense_m[index], dense_v[index] = exp_avg, exp_avg_sq
    optimizer.state[param] = {"step": step - 1, "exp_avg": dense_m, "exp_avg_sq": dense_v}
    param.grad = torch.sparse_coo_tensor(index.unsqueeze(0), grad, (numel,), check_invariants=True)
    optimizer.step()

    (ours,), (m,), (v,), _ = reference.sparse_adam_reference(
        [weight], [grad], [exp_avg], [exp_avg_sq], [], [index], step=step, master_weights="none",
        grad_mul=None, **HYPER,
    )  # fmt: skip
    assert_bits_equal("exp_avg", m, dense_m[index])
    assert_bits_equal("exp_avg_sq", v, dense_v[index])
    sqrt_exact = torch.sqrt(v) == reference.sqrt_rn(v)
    assert sqrt_exact.float().mean() > 0.5
    assert_bits_equal("params where torch's sqrt is exact", ours[index][sqrt_exact], param[index][sqrt_exact])
    torch.testing.assert_close(ours, param, rtol=2**-22, atol=0)
    untouched = torch.ones(numel, dtype=torch.bool)
    untouched[index] = False
    assert_bits_equal("unselected entries", ours[untouched], weight[untouched])


def test_empty_calls_and_empty_selections(target):
    badam_kernels.sparse_adam_([], [], [], [], step=1, lr=1e-3, backend=target.backend)
    p = torch.ones(10, device=target.device)
    empty = torch.zeros(0, device=target.device)
    index = torch.zeros(0, dtype=torch.int32, device=target.device)
    badam_kernels.sparse_adam_([p], [empty], [empty], [empty], indices=[index], step=1, lr=1.0,
                               backend=target.backend)  # fmt: skip
    assert torch.equal(p.cpu(), torch.ones(10))


# ---- bad input ---------------------------------------------------------------------------


def _args(numel=10, count=4, dtype=FP32):
    p = torch.zeros(numel, dtype=dtype)
    index = torch.tensor([0, 2, 5, 9], dtype=torch.int32)[:count]
    return p, index, torch.zeros(count, dtype=dtype), torch.zeros(count), torch.zeros(count)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("bad", [-1, 10], ids=["negative", "past_the_end"])
def test_index_out_of_range_raises_and_writes_nothing(backend, bad):
    if backend not in badam_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    p, index, g, m, v = _args()
    g += 1.0
    index[2] = bad
    with pytest.raises(IndexError, match=r"indices\[0\] holds values in .* but params\[0\] has 10 elements"):
        badam_kernels.sparse_adam_([p], [g], [m], [v], indices=[index], lr=1.0, step=1, backend=backend)
    assert not p.any() and not m.any() and not v.any()


def test_cpu_op_checks_the_index_range_itself():
    """torch.ops.badam_kernels.sparse_adam_ called directly (no Python validation) still refuses."""
    if "cpu" not in badam_kernels.available_backends("cpu"):
        pytest.skip("the C++ CPU backend is not built")
    p, index, g, m, v = _args()
    index[1] = 10
    with pytest.raises(IndexError, match="but params\\[0\\] has 10 elements"):
        torch.ops.badam_kernels.sparse_adam_(
            [p], [g], [m], [v], [], [index], 1.0, 0.9, 0.999, 1e-8, 1, "none", None
        )
    assert not p.any()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bad_arguments_name_the_problem(backend):
    if backend not in badam_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    p, index, g, m, v = _args()

    def call(**kwargs):
        args = {"params": [p], "grads": [g], "exp_avgs": [m], "exp_avg_sqs": [v], "indices": [index]}
        args.update(kwargs)
        badam_kernels.sparse_adam_(
            args.pop("params"), args.pop("grads"), args.pop("exp_avgs"), args.pop("exp_avg_sqs"),
            **{"lr": 1e-3, "step": 1, "backend": backend, **args},
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"grads\[0\] has 5 elements but indices\[0\] has 4"):
        call(grads=[torch.zeros(5)])
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has 10 elements but params\[0\] has 4"):
        call(params=[p[:4]], exp_avgs=[torch.zeros(10)], indices=None)
    with pytest.raises(
        TypeError, match=r"indices\[0\] has dtype torch.float32, expected torch.int32 or torch.int64"
    ):
        call(indices=[index.float()])
    with pytest.raises(ValueError, match="indices has 2 tensors but params has 1"):
        call(indices=[index, index])
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] has dtype torch.bfloat16"):
        call(exp_avg_sqs=[v.bfloat16()])
    with pytest.raises(TypeError, match="master_weights='remainder' needs bf16 params"):
        call(master_weights="remainder", masters=[torch.zeros(4, dtype=torch.int16)])
    with pytest.raises(ValueError, match=r"masters\[0\] has 10 elements but indices\[0\] has 4"):
        call(params=[p.bfloat16()], grads=[g.bfloat16()], master_weights="remainder",
             masters=[torch.zeros(10, dtype=torch.int16)])  # fmt: skip
    with pytest.raises(ValueError, match="masters were given but master_weights='none'"):
        call(masters=[m])
    with pytest.raises(ValueError, match=r"step must be >= 1"):
        call(step=0)
    with pytest.raises(ValueError, match=r"lr must be in \[0.0, inf\), got nan"):
        call(lr=math.nan)
    with pytest.raises(ValueError, match=r"indices\[0\] is not contiguous"):
        call(indices=[torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32)[::2]])
    with pytest.raises(ValueError, match="grad_mul must be a 0-dim fp32 tensor"):
        call(grad_mul=torch.ones(2))


# ---- torch.library -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param_dtype", "mode", "indexed", "with_grad_mul"),
    [(FP32, "none", False, False), (BF16, "remainder", True, True), (FP16, "fp32", True, False)],
    ids=["fp32-none-runs", "bf16-remainder-indexed-grad_mul", "fp16-fp32-indexed"],
)
def test_opcheck(target, param_dtype, mode, indexed, with_grad_mul):
    gen = torch.Generator().manual_seed(8)
    device = target.device
    sizes = [3, 17]
    params = [torch.randn(2 * n, generator=gen).to(param_dtype).to(device) for n in sizes]
    indices = [torch.arange(0, 2 * n, 2, dtype=torch.int32, device=device) for n in sizes] if indexed else []
    if not indexed:
        params = [p[:n].clone() for p, n in zip(params, sizes)]
    grads = [torch.randn(n, generator=gen).to(param_dtype).to(device) for n in sizes]
    masters = {
        "none": [],
        "fp32": [torch.randn(n, generator=gen).to(device) for n in sizes],
        "remainder": [torch.zeros(n, dtype=torch.int16, device=device) for n in sizes],
    }[mode]
    zeros = [torch.zeros(n, device=device) for n in sizes]
    grad_mul = torch.tensor(0.5, device=device) if with_grad_mul else None
    exp_avg_sqs = [z.clone() for z in zeros]
    args = (params, grads, zeros, exp_avg_sqs, masters, indices, 1e-3, 0.9, 0.999, 1e-8, 2, mode, grad_mul)
    torch.library.opcheck(getattr(torch.ops.badam_kernels, SPARSE_ADAM_OP[target.backend]), args)
