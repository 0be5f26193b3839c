"""BlockAdamW, the block-coordinate AdamW optimizer (the badam-compatible classes live in
badam_compat.py).

Only one block (typically one transformer layer) trains at a time. Inactive blocks have
requires_grad off, so autograd never allocates their gradients; the active block's Adam state
(fp32 exp_avg and exp_avg_sq, plus an fp32 master or an int16 remainder) exists only while it
is active; every step is one `fused_adamw_` call per (param group, device, dtype).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from badam_kernels import optimizer_state
from badam_kernels.arguments import as_bool, as_float, as_int
from badam_kernels.checkpointing import BackwardCut
from badam_kernels.compile import WHOLE_MODEL_COMPILE_MESSAGE, is_whole_model_compiled
from badam_kernels.distributed import (
    ActiveBlockGradientSync,
    local_tensor,
    reject_ddp,
    sum_of_squares_over_shards,
)
from badam_kernels.ops import BACKENDS, fused_adamw_, grad_norm, resolve_backend
from badam_kernels.partition import (
    assign_blocks,
    embedding_modules,
    infer_blocks,
    matches_components,
    named_parameters_of,
    no_decay_names,
    tied_aliases,
)
from badam_kernels.schedule import BlockSchedule
from badam_kernels.weak_hooks import SoleOwner, weak_method_hook

log = logging.getLogger("badam_kernels")

MASTER_WEIGHTS = ("auto", "remainder", "fp32", "none")
MASTER_KEYS = {"fp32": "master", "remainder": "remainder"}  # the state entry each mode keeps
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm
NO_GRAD_MESSAGE = (
    "step() found no gradient on any parameter of the active block ({names}). Likely causes: "
    "loss.backward() was not called before step(); or gradient checkpointing with reentrant "
    "checkpoints whose inputs do not require grad (the embedding is frozen), so no gradient reaches "
    "the layers: pass the model itself to BlockAdamW (truncate_backward=True makes the active layer's "
    "input require grad, see badam_kernels.checkpointing) or use use_reentrant=False; or a whole-model "
    "torch.compile that reuses a graph traced while another block was active (torch 2.11): compile the "
    "layers instead, badam_kernels.compile_layers(model)."
)
ACCUMULATION_OVERRUN_MESSAGE = (
    "update_in_backward: parameter {name!r} received more backward passes ({count}) than "
    "gradient_accumulation_steps={steps} before step(); call step() after every "
    "gradient_accumulation_steps backward passes"
)


def _check_hyperparameters(lr, betas, eps, weight_decay) -> tuple[float, tuple[float, float], float, float]:
    """The hyperparameters as Python floats (numpy scalars would not survive a weights_only load
    of the state dict), or a clear error."""
    if isinstance(betas, str) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (
        as_float("lr", lr),
        (as_float("betas[0]", betas[0], high=1.0), as_float("betas[1]", betas[1], high=1.0)),
        as_float("eps", eps),
        as_float("weight_decay", weight_decay),
    )


def master_mode(master_weights: str, stochastic_rounding: bool, dtype: torch.dtype) -> str:
    """The master mode the kernel runs for parameters of `dtype` (fp32 ones are their own master).
    Raises ValueError/TypeError where `master_weights` does not fit the dtype."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"parameters must be bf16, fp16 or fp32, found {dtype}")
    if dtype == torch.float32:
        return "none"
    if master_weights == "auto":
        return "remainder" if dtype == torch.bfloat16 else "fp32"
    if master_weights == "remainder" and dtype != torch.bfloat16:
        raise ValueError(f"master_weights='remainder' needs bf16 parameters, found {dtype}; use 'fp32'")
    if stochastic_rounding and dtype != torch.bfloat16:
        raise ValueError(f"stochastic_rounding needs bf16 parameters, found {dtype}")
    return master_weights


def _check_master_options(master_weights: str, stochastic_rounding: bool, dtypes: set[torch.dtype]) -> None:
    """Refuse master options that contradict each other or the dtypes; warn where they do nothing."""
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {master_weights!r}")
    if stochastic_rounding and master_weights != "none":
        raise ValueError("stochastic_rounding=True needs master_weights='none' (masters are exact already)")
    for dtype in dtypes:
        master_mode(master_weights, stochastic_rounding, dtype)
    if dtypes == {torch.float32} and (stochastic_rounding or master_weights in ("fp32", "remainder")):
        option = "stochastic_rounding=True" if stochastic_rounding else f"master_weights={master_weights!r}"
        warnings.warn(
            f"{option} has no effect: every trainable parameter is fp32, its own exact master",
            stacklevel=4,
        )


def _mix_seed(seed: int, global_step: int, call_index: int) -> int:
    """A distinct stochastic-rounding seed per (step, fused call): per-block step counts
    restart at 1, so the kernel's own (seed, step) pair would repeat its noise."""
    return (seed + 0x9E3779B97F4A7C15 * (global_step + 1) + 0xBF58476D1CE4E5B9 * call_index) % 2**63


# Parameters whose requires_grad a block optimizer turned off (inactive blocks, parameters outside
# every block). Only they count as trainable when a later BlockAdamW is built on the same model:
# any other parameter with requires_grad=False was frozen by the user and stays frozen. (One
# that the user freezes again while an optimizer holds it frozen cannot be told apart.)
_FROZEN_BY_OPTIMIZER = torch.utils.weak.WeakIdKeyDictionary()


def user_frozen(named: Sequence[tuple[str, torch.Tensor]]) -> set[str]:
    """Names of the parameters the user froze (requires_grad=False, not by a block optimizer)."""
    return {name for name, p in named if not p.requires_grad and p not in _FROZEN_BY_OPTIMIZER}


def _freeze(p: torch.Tensor) -> None:
    if p.requires_grad:
        _FROZEN_BY_OPTIMIZER[p] = True
        p.requires_grad_(False)
    p.grad = None


def _unfreeze(p: torch.Tensor) -> None:
    _FROZEN_BY_OPTIMIZER.pop(p, None)
    p.requires_grad_(True)


def _flat(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """1-D views of contiguous tensors (of the local shard, for FSDP2's DTensors): the kernels'
    in-place writes land in the originals."""
    return [local_tensor(t).view(-1) for t in tensors]


def _check_same_layout(saved: dict[str, list], here: dict[str, list]) -> None:
    """Raise ValueError naming the first difference between a saved layout and this optimizer's."""

    def refuse(what: str) -> None:
        raise ValueError(f"cannot load this state dict: {what}; it was saved for another model or blocks")

    def first_difference(a: list, b: list) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def describe(what: str, saved_items: list, items: list) -> str:
        i = first_difference(saved_items, items)
        if i < min(len(saved_items), len(items)):
            return f"its {what} {i} is {saved_items[i]!r}, this optimizer's is {items[i]!r}"
        where, extra = (
            ("the state dict", saved_items[i]) if i < len(saved_items) else ("this optimizer", items[i])
        )
        return (
            f"it has {len(saved_items)} {what}s, this optimizer {len(items)} ({extra!r} is only in {where})"
        )

    if saved["names"] != here["names"]:
        refuse(describe("parameter", saved["names"], here["names"]))
    for key, what in (("shapes", "shape"), ("dtypes", "dtype")):
        if saved[key] != here[key]:
            i = first_difference(saved[key], here[key])
            refuse(
                f"parameter {here['names'][i]!r} was saved with {what} {saved[key][i]}, this optimizer's has "
                f"{here[key][i]}"
            )
    if len(saved["blocks"]) != len(here["blocks"]):
        refuse(f"it has {len(saved['blocks'])} blocks, this optimizer {len(here['blocks'])}")
    for b, (saved_block, block) in enumerate(zip(saved["blocks"], here["blocks"])):
        if saved_block != block:
            refuse(describe(f"blocks[{b}] parameter", saved_block, block))


class BlockAdamW(SoleOwner, Optimizer):
    """Block-coordinate AdamW (BAdam) with fused kernels: one block trains at a time.

    Args:
        model_or_named_params: an nn.Module, or (name, parameter) pairs.
        lr, betas, eps, weight_decay: AdamW hyperparameters (decoupled decay; biases and norm
            weights get none). Read from `param_groups` at every step, so LR schedulers work.
        switch_every: steps each block stays active.
        switch_mode: "random" (a new permutation each pass, from `seed`, independent of torch's
            global RNG), "ascending", "descending" or "fixed" (one block, one continuous AdamW run).
        blocks: lists of name prefixes, one list per block; default one block per transformer
            layer (Llama, GPT-2, BERT, T5 naming). A prefix selects whole name components:
            "model.layers.1" selects "model.layers.1.mlp.up_proj.weight", not layer 10's.
        include_embedding, include_lm_head: add the embedding / the head (lm_head, final norm)
            as blocks of their own when blocks are inferred. Given the model, the embedding is
            found by structure (get_input_embeddings(), nn.Embedding); a weight tied between the
            two trains in the embedding block, or in the head block without include_embedding.
        always_active: name prefixes trained at every step, outside the blocks.
            Prefixes also select tied weights by their other name ("lm_head" with
            tie_word_embeddings, a warning names the parameter it is tied to). Parameters frozen
            (requires_grad=False) before the optimizer is built are in no block and stay frozen;
            a prefix that selects only frozen parameters is an error.
        start_block: index of the first block (in random mode, the first pass then visits the
            other blocks once each in random order).
        master_weights: "auto" ("remainder" for bf16, "fp32" for fp16), "remainder", "fp32" or
            "none" (update the low-precision weight directly; see stochastic_rounding).
        stochastic_rounding: with master_weights="none", round bf16 results stochastically.
        max_grad_norm: clip the active gradients to this total L2 norm (no host sync).
        backend: kernel backend for `fused_adamw_` ("auto", "cuda", "triton", "cpu", "torch").
        seed: seeds the random block order and stochastic rounding.
        verbose: 0 silent; 1 logs each switch; 2 also lists the active parameter names.
        update_in_backward: update each active parameter from its post-accumulate-grad hook during
            backward, one fused call per tensor, and free its gradient at once: the gradients
            held at the peak are one tensor instead of the whole block. step() and zero_grad()
            are still called as usual; step() then only advances the schedule (and updates
            parameters whose accumulation window was cut short). Same iterates as the normal
            mode (stochastic rounding draws other noise); cannot be combined with max_grad_norm
            (global-norm clipping needs every gradient before any update) or
            torch.amp.GradScaler (it unscales after backward, and shows itself only in
            scaler.step(): so the first step keeps its gradients for step() like the normal mode,
            and step() refuses a scaler before any weight has changed).
        gradient_accumulation_steps: with update_in_backward, the number of backward passes
            per step(); parameters are updated on the last one.
        truncate_backward: when `model_or_named_params` is a module, stop backward at the input
            of the lowest active layer (badam_kernels.checkpointing.BackwardCut), so gradient
            checkpointing, reentrant included, trains the active block without any backward
            through the frozen layers below it.
        process_group: data parallel without DDP: average the active block's gradients over this
            torch.distributed group, all-reduced during backward (badam_kernels.distributed;
            `optimizer.gradient_sync` then counts the bytes and offers no_sync()). Leave None
            with FSDP2 (fully_shard), which reduces the gradients itself.

    A newly active block starts with fresh Adam state (step 1), like badam; a block that stays
    active across a switch (fixed mode, a single block) keeps its state. With a GradScaler
    a skipped (inf) step writes nothing but still counts towards the schedule and Adam's step,
    because skipping is decided on the device without a host sync.

    One optimizer acts on a parameter at a time: building a new BlockAdamW (or BlockOptimizer) on
    parameters of one that is still alive (an LR scheduler holds it) takes them over, with a
    warning: the old one's backward cut and hooks leave the model and its step() raises.

    Example:
        >>> model = transformers.AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16)
        >>> opt = BlockAdamW(model, lr=1e-5, switch_every=50, switch_mode="random")
        >>> for batch in loader:
        ...     model(**batch).loss.backward()
        ...     opt.step()  # gradients of the active block are released here
    """

    # torch.amp.GradScaler then sets `grad_scale` and `found_inf` on the optimizer instead of
    # unscaling and syncing on the host; step() hands both to the kernel.
    _step_supports_amp_scaling = True
    # update_in_backward and the backward cut; BlockOptimizer keeps these defaults.
    _update_in_backward = False
    _accumulation_steps = 1
    _backward_cut: BackwardCut | None = None
    _backward_hooks: tuple[torch.utils.hooks.RemovableHandle, ...] = ()
    _no_grad_scaler_seen = False  # update_in_backward: the first step() found no GradScaler
    # One optimizer acts on a parameter: the newest takes over (weak_hooks.SoleOwner).
    _in_charge = False
    # Averages the active block's gradients over `process_group` (badam_kernels.distributed).
    gradient_sync: ActiveBlockGradientSync | None = None

    def __init__(
        self,
        model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_every: int = 50,
        switch_mode: str = "random",
        blocks: Sequence[Sequence[str]] | None = None,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        always_active: Sequence[str] = (),
        start_block: int | None = None,
        master_weights: str = "auto",
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        seed: int = 0,
        verbose: int = 1,
        update_in_backward: bool = False,
        process_group: Any = None,
        gradient_accumulation_steps: int = 1,
        truncate_backward: bool = True,
    ) -> None:
        model, named = named_parameters_of(model_or_named_params)
        reject_ddp(model_or_named_params, [name for name, _ in named])
        update_in_backward = as_bool("update_in_backward", update_in_backward)
        truncate_backward = as_bool("truncate_backward", truncate_backward)
        if model is not None and is_whole_model_compiled(model):
            warnings.warn(WHOLE_MODEL_COMPILE_MESSAGE, stacklevel=2)
        self._configure_backward(
            update_in_backward, gradient_accumulation_steps, max_grad_norm, process_group,
            BackwardCut(model) if truncate_backward and model is not None else None,
        )  # fmt: skip
        names = [name for name, _ in named]
        include_embedding = as_bool("include_embedding", include_embedding)
        include_lm_head = as_bool("include_lm_head", include_lm_head)
        frozen = user_frozen(named)
        if len(frozen) == len(names):
            raise ValueError("every parameter is frozen (requires_grad=False): there is nothing to train")
        aliases = None if model is None else tied_aliases(model)
        if blocks is None:
            blocks = infer_blocks(
                names,
                include_embedding,
                include_lm_head,
                aliases=aliases,
                embeddings=() if model is None else embedding_modules(model),
                frozen=frozen,
            )
        block_members, always_members = assign_blocks(
            names, blocks, always_active, match=matches_components, aliases=aliases, frozen=frozen
        )
        schedule = BlockSchedule(
            len(block_members), switch_every, switch_mode, start_block, seed=as_int("seed", seed, 0, 2**63)
        )
        if process_group is not None:  # before _setup, whose first block activation it watches
            self.gradient_sync = ActiveBlockGradientSync(process_group, named, model)
        self._setup(
            named,
            block_members,
            always_members,
            no_decay_names(model, names),
            schedule,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            no_decay_weight_decay=0.0,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            max_grad_norm=max_grad_norm,
            backend=backend,
            verbose=verbose,
            log_fn=None,
            reset_always_active=False,
        )

    # ---- construction -------------------------------------------------------------------

    def _setup(
        self,
        named,
        block_members,
        always_members,
        no_decay,
        schedule,
        *,
        lr,
        betas,
        eps,
        weight_decay,
        no_decay_weight_decay,
        master_weights,
        stochastic_rounding,
        max_grad_norm,
        backend,
        verbose,
        log_fn,
        reset_always_active,
        extra_defaults=None,
    ) -> None:
        """Shared by both classes: validate, build the two param groups, activate the first block."""
        lr, betas, eps, weight_decay = _check_hyperparameters(lr, betas, eps, weight_decay)
        no_decay_weight_decay = as_float("weight_decay", no_decay_weight_decay)
        if max_grad_norm is not None:
            max_grad_norm = as_float("max_grad_norm", max_grad_norm)
            if max_grad_norm == 0:
                raise ValueError("max_grad_norm must be a positive float or None, got 0.0")
        verbose = as_int("verbose", int(verbose) if isinstance(verbose, bool) else verbose, low=0)
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"log_fn must be callable or None, got {type(log_fn).__name__}")
        stochastic_rounding = as_bool("stochastic_rounding", stochastic_rounding)
        trainable = sorted({i for block in block_members for i in block} | set(always_members))
        for i in trainable:
            name, p = named[i]
            if not p.is_leaf:
                raise ValueError(f"parameter {name!r} is not a leaf tensor")
            if not p.is_contiguous():
                raise ValueError(
                    f"parameter {name!r} is not contiguous; the fused kernels update weights in place and "
                    "need them contiguous: make the parameter itself contiguous before building the "
                    "optimizer (param.data = param.data.contiguous())"
                )
        self._names = {named[i][1]: named[i][0] for i in trainable}
        _check_master_options(master_weights, stochastic_rounding, {named[i][1].dtype for i in trainable})
        self._check_backend(backend, {named[i][1].device for i in trainable})
        fp32_names = [named[i][0] for i in trainable if named[i][1].dtype == torch.float32]
        if fp32_names:
            warnings.warn(
                f"{len(fp32_names)} trainable parameters are fp32 (e.g. {fp32_names[0]!r}); BAdam saves "
                "memory with bf16/fp16 weights: load the model in bf16 (torch_dtype=torch.bfloat16).",
                stacklevel=3,
            )
        self._blocks = [[named[i][1] for i in block] for block in block_members]
        self._always_active = [named[i][1] for i in always_members]
        self._schedule = schedule
        self._master_weights = master_weights
        self._master_modes: dict[torch.dtype, str] = {}  # filled per dtype at the first step that meets it
        self._stochastic_rounding = stochastic_rounding
        self._max_grad_norm = max_grad_norm
        self._backend = backend
        self._reset_always_active = reset_always_active
        self.verbose = verbose
        self._log_fn = log_fn or log.info
        decay = [named[i][1] for i in trainable if named[i][0] not in no_decay]
        undecayed = [named[i][1] for i in trainable if named[i][0] in no_decay]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": undecayed, "weight_decay": no_decay_weight_decay},
        ]
        defaults = {
            **(extra_defaults or {}),
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        self._constructing = True
        super().__init__([g for g in groups if g["params"]], defaults)
        self._constructing = False
        for _, p in named:
            if p not in self._names:  # neither in a block nor always active: frozen, as in badam
                _freeze(p)
        self._activate(self._schedule.current, first=True)

    @staticmethod
    def _check_backend(backend: str, devices: set[torch.device]) -> None:
        """Refuse at construction a backend that cannot run on the parameters' devices."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for device in devices:
            if device.type != "meta":
                resolve_backend(backend, device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: blocks are fixed when the optimizer is built."""
        if not getattr(self, "_constructing", False):
            raise RuntimeError(
                f"{type(self).__name__} does not support add_param_group: its blocks are fixed at "
                "construction; build a new optimizer over all the parameters instead"
            )
        super().add_param_group(param_group)

    # ---- blocks -------------------------------------------------------------------------

    @property
    def active_block(self) -> int:
        """Index of the block trained at the next step."""
        return self._schedule.current

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def active_parameter_names(self) -> list[str]:
        """Names of the parameters trained at the next step (the block plus always_active)."""
        return [self._names[p] for p in self._active_params()]

    def _active_params(self) -> list[torch.Tensor]:
        return self._blocks[self._schedule.current] + self._always_active

    def _activate(self, block: int, first: bool = False, announce: bool = True) -> None:
        """Make `block` the trainable one; free everything held for the others. `announce`: log
        the block (at verbose >= 1)."""
        self._check_in_charge()
        active = set(self._blocks[block])
        for params in self._blocks:
            for p in params:
                if p in active:
                    _unfreeze(p)
                else:
                    _freeze(p)
                p.grad = None
                self._release(p)
        for p in self._always_active:
            _unfreeze(p)
            if self._reset_always_active and not first:
                self._release(p)
        if announce and self.verbose >= 1:
            self._log_fn(f"BAdam: training block {block} of {len(self._blocks)}")
        if announce and self.verbose >= 2:
            self._log_fn("BAdam: trainable parameters: " + ", ".join(self.active_parameter_names()))
        if self.gradient_sync is not None:
            self.gradient_sync.watch(self._active_params(), self._schedule)
        self._rewire_backward()

    def _release(self, p: torch.Tensor) -> None:
        self.state.pop(p, None)

    # ---- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step on the active block, then release its gradients; switch blocks when due."""
        self._check_in_charge()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._update_in_backward:
            self._finish_backward_updates()
            if self._schedule.step():
                self._activate(self._schedule.current)
            return loss
        active = self._active_params()
        block = self._blocks[self._schedule.current]
        # Checked on the block, not on always_active too: an always-active head with a gradient
        # must not hide a block that silently receives none.
        if not any(p.grad is not None for p in block):
            raise self._no_gradient_error(block)
        if self.gradient_sync is not None:
            self.gradient_sync.synchronize(getattr(self, "found_inf", None))
        with_grad = [p for p in active if p.grad is not None]
        self._update(with_grad)
        for p in active:
            p.grad = None
        if self._schedule.step():
            self._activate(self._schedule.current)
        return loss

    def _grad_multiplier(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(grad_mul, found_inf) as device tensors: GradScaler's unscale times the clip factor."""
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler.step
        found_inf = getattr(self, "found_inf", None)
        device = grads[0].device
        inv_scale = None
        if grad_scale is not None:
            inv_scale = torch.as_tensor(grad_scale, device=device).double().reciprocal().float().reshape(())
        if self._max_grad_norm is None:
            return inv_scale, found_inf
        by_device = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        squares = [
            grad_norm(_flat(gs), backend=self._backend).to(device).square() for gs in by_device.values()
        ]
        norm = sum_of_squares_over_shards(torch.stack(squares).sum(), grads).sqrt()
        if inv_scale is not None:
            norm = norm * inv_scale
        grad_mul = (self._max_grad_norm / (norm + CLIP_EPS)).clamp(max=1.0)
        return (grad_mul if inv_scale is None else grad_mul * inv_scale), found_inf

    def _master_mode(self, p: torch.Tensor) -> str:
        """The master mode for `p`'s dtype, resolved with the constructor's rules the first time a
        step meets that dtype: the model's dtype may change after construction (model.to(...))."""
        mode = self._master_modes.get(p.dtype)
        if mode is None:
            try:
                mode = master_mode(self._master_weights, self._stochastic_rounding, p.dtype)
            except (TypeError, ValueError) as exc:
                raise type(exc)(
                    f"parameter {self._names[p]!r} is {p.dtype} now: {exc}. Its dtype changed after the "
                    "optimizer was built; build the optimizer after converting the model"
                ) from None
            self._master_modes[p.dtype] = mode
        return mode

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The Adam state of `p`, allocated at its block's first step."""
        state = self.state[p]
        mode = self._master_mode(p)
        if not state:
            state["step"] = 0
            # zeros_like: a DTensor parameter (FSDP2) gets state sharded like it, for DCP.
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if mode == "fp32":
                state["master"] = p.detach().to(torch.float32, copy=True)
            elif mode == "remainder":  # remainder 0: the master starts at the bf16 value, as in badam
                state["remainder"] = torch.zeros_like(p, dtype=torch.int16)
        elif {key for key in MASTER_KEYS.values() if key in state} != {MASTER_KEYS.get(mode)} - {None}:
            raise RuntimeError(
                f"parameter {self._names[p]!r} is {p.dtype} now, but its Adam state was made for another "
                f"dtype (it holds {sorted(state)}, {p.dtype} needs master_weights={mode!r}): its dtype "
                "changed while its block was active. Convert the model before building the optimizer"
            )
        return state

    def _update(self, params: list[torch.Tensor], first_call_index: int = 0) -> None:
        """One fused call per (param group, device, dtype, Adam step) over the params with grads;
        calls are numbered from `first_call_index` to give each its own stochastic-rounding seed."""
        for p in params:  # every check before the first state changes
            if not local_tensor(p).is_contiguous():
                raise ValueError(
                    f"parameter {self._names[p]!r} is no longer contiguous (its layout changed after the "
                    "optimizer was built, e.g. model.to(memory_format=...)); the fused kernels update it in "
                    "place: make the parameter itself contiguous again"
                )
            self._state_of(p)
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        grad_of = dict(zip(params, grads))
        grad_mul, found_inf = self._grad_multiplier(grads)
        calls: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in grad_of:
                    state = self.state[p]
                    state["step"] += 1
                    calls[(group_index, p.device, p.dtype, state["step"])].append(p)
        for call_index, ((group_index, device, dtype, step), ps) in enumerate(calls.items()):
            group = self.param_groups[group_index]
            mode = self._master_mode(ps[0])
            states = [self.state[p] for p in ps]
            master_key = MASTER_KEYS.get(mode)
            fused_adamw_(
                _flat(ps),
                _flat(grad_of[p] for p in ps),
                _flat(s["exp_avg"] for s in states),
                _flat(s["exp_avg_sq"] for s in states),
                lr=float(group["lr"]),
                beta1=float(group["betas"][0]),
                beta2=float(group["betas"][1]),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                step=step,
                master_weights=mode,
                masters=None if master_key is None else _flat(s[master_key] for s in states),
                stochastic_rounding=self._stochastic_rounding and dtype == torch.bfloat16,
                seed=_mix_seed(
                    self._schedule.seed or 0, self._schedule.global_step, first_call_index + call_index
                ),
                grad_mul=None if grad_mul is None else grad_mul.to(device),
                found_inf=None if found_inf is None else found_inf.to(device).float().reshape(()),
                backend=self._backend,
            )

    # ---- update in backward, the backward cut, and who acts on the parameters ---------------

    def _configure_backward(
        self,
        update_in_backward: bool,
        gradient_accumulation_steps: int,
        max_grad_norm: float | None,
        process_group: Any,
        backward_cut: BackwardCut | None,
    ) -> None:
        """Validate the update_in_backward options; refuse what that mode cannot honour."""
        steps = as_int("gradient_accumulation_steps", gradient_accumulation_steps, low=1)
        if steps > 1 and not update_in_backward:
            raise ValueError(
                "gradient_accumulation_steps is only used with update_in_backward=True; in the normal "
                "mode accumulate by calling backward() several times before step()"
            )
        if update_in_backward and max_grad_norm is not None:
            raise ValueError(
                "update_in_backward=True cannot clip to max_grad_norm: global-norm clipping needs every "
                "gradient of the block before the first update, and this mode updates each parameter "
                "as soon as its gradient is ready; use update_in_backward=False to clip"
            )
        if update_in_backward and process_group is not None:
            raise ValueError("update_in_backward=True cannot be combined with process_group")
        self._update_in_backward = bool(update_in_backward)
        self._accumulation_steps = steps
        self._backward_cut = backward_cut

    def _rewire_backward(self) -> None:
        """After a switch: update hooks on the new active parameters only, and the cut moved to
        the new lowest active layer. The first call (construction) takes the parameters over from
        any older optimizer still acting on them: one model, one cut and one set of hooks."""
        if not self._in_charge:
            self._take_over(self._names)
            self._in_charge = True
        for handle in self._backward_hooks:
            handle.remove()
        self._backward_hooks = ()
        self._micro_batches: dict[torch.Tensor, int] = {}
        self._updated_in_backward = False
        active = self._active_params()
        if self._update_in_backward:
            self._active_index = {p: i for i, p in enumerate(active)}
            hook = weak_method_hook(self, "_update_from_backward")
            self._backward_hooks = tuple(p.register_post_accumulate_grad_hook(hook) for p in active)
        if self._backward_cut is not None:
            self._backward_cut.move_to(self._names[p] for p in active)

    def _remove_hooks(self) -> None:
        """A newer optimizer took over (some of) these parameters: remove everything this one
        put on the model."""
        for handle in self._backward_hooks:
            handle.remove()
        self._backward_hooks = ()
        if self._backward_cut is not None:
            self._backward_cut.remove()
            self._backward_cut = None
        if self.gradient_sync is not None:
            self.gradient_sync.unwatch()

    def _no_gradient_error(self, params: list[torch.Tensor]) -> RuntimeError:
        shown = ", ".join(self._names[p] for p in params[:3]) + (", ..." if len(params) > 3 else "")
        message = NO_GRAD_MESSAGE.format(names=shown)
        cause = None if self._backward_cut is None else self._backward_cut.no_gradient_cause()
        return RuntimeError(message if cause is None else f"{message} Seen in the last forward: {cause}")

    def _update_from_backward(self, p: torch.Tensor) -> None:
        """The post-accumulate-grad hook: update `p` after its last micro-batch, free its grad.

        Not before the first step() has shown that no GradScaler is at work: a scaler makes itself
        known only in scaler.step(optimizer), after backward, so the first window's gradients are
        kept for step() (which refuses a scaler before touching any weight) like the normal mode."""
        count = self._micro_batches.get(p, 0) + 1
        self._micro_batches[p] = count
        if count > self._accumulation_steps:
            raise RuntimeError(
                ACCUMULATION_OVERRUN_MESSAGE.format(
                    name=self._names[p], count=count, steps=self._accumulation_steps
                )
            )
        if count < self._accumulation_steps or not self._no_grad_scaler_seen:
            return
        with torch.no_grad():
            self._update([p], first_call_index=self._active_index[p])
        p.grad = None
        self._updated_in_backward = True

    def _finish_backward_updates(self) -> None:
        """step() in update_in_backward mode: update what the hooks left pending (a short
        accumulation window, or the first step), then reset the counts."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "update_in_backward=True cannot be combined with torch.amp.GradScaler: it updates the "
                "parameters during backward, from still-scaled gradients, before the scaler could "
                "unscale them or skip an inf step. "
                + (
                    "The parameters were already updated in this backward (the scaler was not there "
                    "at the first step). "
                    if self._no_grad_scaler_seen
                    else "No parameter was changed. "
                )
                + "Train in bf16 without a scaler, or use update_in_backward=False."
            )
        self._no_grad_scaler_seen = True
        active = self._active_params()
        pending = [p for p in active if p.grad is not None]
        if not pending and not self._updated_in_backward:
            raise self._no_gradient_error(active)
        if pending:
            self._update(pending)
        for p in active:
            p.grad = None
        self._micro_batches = {}
        self._updated_in_backward = False

    # ---- checkpoints and introspection ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus the block schedule under "block_schedule" and, under
        "block_layout", what a loading optimizer must match (see `load_state_dict`)."""
        state_dict = super().state_dict()
        state_dict["block_schedule"] = self._schedule.state_dict()
        state_dict["block_layout"] = self._layout()
        return state_dict

    def _layout(self) -> dict[str, list]:
        """Parameter names, shapes and dtypes in state-dict index order, and the blocks by name
        (the always-active parameters are the names in no block)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {
            "names": [self._names[p] for p in params],
            "shapes": [list(p.shape) for p in params],
            "dtypes": [str(p.dtype).removeprefix("torch.") for p in params],
            "blocks": [[self._names[p] for p in block] for block in self._blocks],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore Adam state, masters, hyperparameters and the schedule, keeping the fp32/int16
        state dtypes (torch's loader would cast them to the parameter dtype).

        The state dict must come from an optimizer with the same parameters (names, shapes,
        dtypes), blocks and always-active parameters; otherwise ValueError names the first
        difference and nothing is loaded. The saved schedule wins over the constructor's
        switch_every and seed (with a warning where they differ); hyperparameters come from the
        saved param groups, as with torch's optimizers. State dicts saved before the layout was
        recorded still load, with fewer checks and a warning."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        if "block_schedule" not in state_dict:
            raise ValueError("the state dict has no 'block_schedule': it was not saved by BlockAdamW")
        if "block_layout" in state_dict:
            _check_same_layout(state_dict["block_layout"], self._layout())
        else:
            warnings.warn(
                "this state dict was saved without 'block_layout' (by an older badam_kernels): only its "
                "parameter counts and state shapes can be checked against this optimizer",
                stacklevel=2,
            )
        optimizer_state.check_param_groups(self, state_dict)
        param_of = {
            index: p
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
            for index, p in zip(saved["params"], group["params"])
        }
        for index, saved in state_dict["state"].items():
            if index not in param_of:
                raise ValueError(
                    f"cannot load this state dict: it has state for parameter {index!r}, "
                    "which none of its param groups lists"
                )
            self._check_loaded_state(param_of[index], saved)
        block = self._schedule.current
        self._schedule.load_state_dict(state_dict["block_schedule"])
        # accelerate's prepare() reloads the optimizer's own state dict: a block that does not
        # change is not a switch, so it is not logged again.
        self._activate(self._schedule.current, first=True, announce=self._schedule.current != block)
        optimizer_state.restore_state(self, state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any]) -> None:
        """Refuse saved Adam state this optimizer could not continue: tensors of another shape,
        or a master kept in another form than this optimizer's master mode for `p`."""
        name = self._names[p]
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"cannot load this state dict: the saved {key} of {name!r} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                )
        mode = self._master_mode(p)
        held = {key for key in MASTER_KEYS.values() if key in saved}
        if held != {MASTER_KEYS.get(mode)} - {None}:
            raise ValueError(
                f"cannot load this state dict: the saved state of {name!r} holds {sorted(saved)}, but this "
                f"optimizer keeps {p.dtype} parameters with master_weights={mode!r}; build it with the "
                "master_weights of the saved run"
            )

    def memory_summary(self) -> dict[str, int]:
        """Bytes held now: Adam state (exp_avg, exp_avg_sq), masters/remainders, gradients, and the
        number of elements in the active block."""
        state_bytes, master_bytes = optimizer_state.state_bytes(self)
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self._names if p.grad is not None)
        return {
            "state_bytes": state_bytes,
            "master_bytes": master_bytes,
            "grad_bytes": grad_bytes,
            "active_numel": sum(p.numel() for p in self._active_params()),
        }
