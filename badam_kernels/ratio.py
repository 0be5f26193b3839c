"""BlockOptimizerRatio, the fused drop-in for badam's ratio mode (`badam.BlockOptimizerRatio`).

Every trainable parameter updates a fraction of its entries: its "mask" for a period of
`switch_every` steps. The mask is badam's, entry for entry:
  * "adjacent": the run of int(numel * ratio) entries of the flattened parameter starting at the
    parameter's offset, wrapping around to its start (two runs then);
  * "scatter": those positions of a random permutation of the entries, drawn from the
    parameter's seed (badam draws the seeds from torch's global RNG at construction).
After each period the offset moves on by int(numel * ratio) and the Adam state starts afresh.

What differs from badam is how the update runs. A post-accumulate-grad hook copies the selected
gradient entries into a compact tensor (a slice for adjacent masks, an index_select for scattered
ones) and frees the dense gradient at once, so backward holds one dense gradient at a time and
no sparse COO tensor or int64 index is ever built per step. step() then applies SparseAdam to
every selected entry in one `sparse_adam_` call per (param group, device, dtype): fp32 Adam state
and, for bf16/fp16 models, master weights of the selected entries (badam updates bf16 weights
directly and keeps bf16 state, so at small learning rates most of its updates round away).
There are no host syncs and no `torch.cuda.empty_cache()` calls.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch.optim import Optimizer

from badam_kernels import optimizer_state
from badam_kernels.ops import BACKENDS, grad_norm, sparse_adam_
from badam_kernels.optim import _check_hyperparameters, _check_master_options, master_mode
from badam_kernels.partition import named_parameters_of
from badam_kernels.weak_hooks import SoleOwner, weak_method_hook

log = logging.getLogger("badam_kernels")

MASK_MODES = ("adjacent", "scatter")
NO_RATIO_OVERRIDES: Mapping[str, float] = MappingProxyType({})
# badam adds this to the whole gradient of small (numel < preserve_threshold) and of fully
# updated (ratio 1) parameters before making it sparse, so that no zero entry is dropped; it
# is part of badam's update, so it is part of ours.
GRADIENT_NUDGE = 1e-9
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm
NO_GRAD_MESSAGE = (
    "step() found no gradient taken from any trainable parameter since the last step: call "
    "loss.backward() before step()"
)


@dataclass
class _Entry:
    """What the optimizer keeps for one trainable parameter."""

    name: str
    numel: int
    ratio: float
    seed: int
    offset: int = 0

    @property
    def count(self) -> int:
        """Entries selected per period: badam's int(numel * ratio)."""
        return int(self.numel * self.ratio)


@dataclass(frozen=True)
class Selection:
    """The selected entries of a flattened parameter, in the order of the compact gradient and
    state: `runs` of (start, length) for a contiguous selection (the low run first when an
    adjacent mask wraps, as badam's coalesced sparse tensors order them), or a sorted `index`."""

    runs: tuple[tuple[int, int], ...] = ()
    index: torch.Tensor | None = None

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The selected entries of `flat` as a new compact tensor (never a view that would keep
        the dense tensor alive)."""
        if self.index is not None:
            return flat.index_select(0, self.index)
        if len(self.runs) == 1:
            start, length = self.runs[0]
            return flat[start : start + length].clone()
        return torch.cat([flat[start : start + length] for start, length in self.runs])

    def pieces(self, flat_param: torch.Tensor, compact: Sequence[torch.Tensor]):
        """(param piece, compact pieces) pairs for sparse_adam_: one per run, or the whole param
        with the compact tensors for an index."""
        if self.index is not None:
            return [(flat_param, list(compact))]
        out, position = [], 0
        for start, length in self.runs:
            out.append(
                (flat_param[start : start + length], [t[position : position + length] for t in compact])
            )
            position += length
        return out


def adjacent_selection(numel: int, count: int, offset: int) -> Selection:
    """badam's "adjacent" mask: `count` entries from `offset`, wrapping around."""
    if offset + count > numel:
        return Selection(runs=((0, offset + count - numel), (offset, numel - offset)))
    return Selection(runs=((offset, count),))


def scatter_selection(numel: int, count: int, offset: int, seed: int, device: torch.device) -> Selection:
    """badam's "scatter" mask: entries perm[offset : offset + count] (wrapping around) of
    randperm(numel) drawn from `seed` on `device`, sorted. badam reseeds torch's global RNG for
    this; a private generator gives the same permutation and leaves the global RNG alone.

    Cost: one randperm of numel int64 (8 bytes per element, transient) and a sort of `count`
    entries, once per mask and period; the index is kept as int32 (int64 past 2**31 elements),
    4 bytes per selected entry, for the period.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    perm = torch.randperm(numel, generator=generator, device=device)
    if offset + count > numel:
        chosen = torch.cat([perm[offset:], perm[: offset + count - numel]])
    else:
        chosen = perm[offset : offset + count]
    dtype = torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64
    return Selection(index=chosen.sort().values.to(dtype))


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    return float(value)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class BlockOptimizerRatio(SoleOwner, Optimizer):
    """Drop-in replacement for `badam.BlockOptimizerRatio` (badam's ratio mode) on fused kernels:
    same signature and defaults, masks, offsets, switch steps, state resets and update math
    (torch.optim.SparseAdam's: eps outside the bias correction, no weight decay).

    Args (badam's):
        param_groups: parameters or param-group dicts, as for any torch optimizer. A group's
            "weight_decay" is ignored, as badam ignores it.
        named_parameters_list: (name, parameter) pairs of the model; names choose the per-name
            ratios and the embedding / lm_head to freeze.
        update_ratio: fraction of each parameter's entries updated per period, in (0, 1].
        verbose: 0 silent; 1 logs each new mask period.
        switch_every: steps per mask period; the Adam state restarts after each.
        preserve_threshold: parameters with fewer entries get badam's 1e-9 gradient nudge.
        param_update_ratios: {name fragment: ratio}; a parameter whose name contains a fragment
            uses that ratio (the last matching fragment wins, as in badam).
        mask_mode: "adjacent" or "scatter".
        lr, betas, eps: defaults for the groups (ignored when optimizer_defaults is given).
        optimizer_defaults: the groups' defaults as a dict, replacing lr, betas and eps.
        keep_mask: share one mask among parameters of the same shape (and ratio) within a
            period, as badam does; at a period's last step badam gives each parameter but the
            first its own mask, and so does this class.
        include_embedding, include_lm_head: when False, freeze the first parameter whose name
            contains "embed" / "lm_head", as badam does.

    Args (this class only, keyword-only):
        master_weights: "auto" (an int16 remainder for bf16 params, an fp32 master for fp16,
            nothing for fp32), "remainder", "fp32" or "none" (update the low-precision weight
            directly, like badam). Masters exist for the selected entries, for one period.
        backend: sparse_adam_'s backend ("auto", "cuda", "triton", "cpu", "torch").
        fused, foreach: accepted and ignored (the update is always one fused call), so that the
            keyword arguments of transformers' adamw_torch(_fused) pass through.

    Differences from badam, all deliberate: fp32 Adam state (badam keeps it in the model's
    dtype) and master weights, so bf16 models move at small learning rates; masks built once per
    period instead of at every step, from private generators (badam reseeds torch's global RNG
    with each parameter's seed whenever it builds a scatter mask); with gradient accumulation
    the micro-batch gradients are summed on the selected entries and offsets advance once per
    step (badam re-masks and advances at every micro-batch); step() without any gradient is an
    error; small parameters with ratio 1 get the 1e-9 nudge once (badam fails on them).
    Mask shapes with different ratios are never shared (badam would share, then fail).
    For fp32 parameters the iterates are badam's up to the rounding of its CPU sqrt.
    Clip with this optimizer's `clip_grad_norm_` (the dense gradients are gone after backward,
    so torch's clip_grad_norm_ on the model sees none); it clips for real, where badam's
    clip_grad_norm_old_version scales a detached copy of its sparse gradients and so, measured
    with torch 2.13, clips nothing. torch.amp.GradScaler is not supported (gradients are taken
    during backward, before it could unscale them).

    Example:
        >>> opt = BlockOptimizerRatio(model.parameters(), list(model.named_parameters()),
        ...                           update_ratio=0.1, switch_every=100, mask_mode="adjacent", lr=1e-5)
        >>> model(**batch).loss.backward()  # each gradient is reduced to its selection and freed
        >>> opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        param_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        named_parameters_list: Iterable[tuple[str, torch.Tensor]],
        update_ratio: float = 0.1,
        verbose: int = 1,
        switch_every: int = 100,
        preserve_threshold: int = 100,
        param_update_ratios: Mapping[str, float] = NO_RATIO_OVERRIDES,
        mask_mode: str = "adjacent",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        optimizer_defaults: dict[str, Any] | None = None,
        keep_mask: bool = True,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        *,
        master_weights: str = "auto",
        backend: str = "auto",
        fused: bool | None = None,
        foreach: bool | None = None,
    ) -> None:
        self.update_ratio = _check_ratio("update_ratio", update_ratio)
        self.switch_every = _check_int("switch_every", switch_every, 1)
        self.preserve_threshold = _check_int("preserve_threshold", preserve_threshold, 0)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if not isinstance(param_update_ratios, Mapping):
            raise TypeError(
                f"param_update_ratios must be a mapping, got {type(param_update_ratios).__name__}"
            )
        ratios = {
            str(k): _check_ratio(f"param_update_ratios[{k!r}]", v) for k, v in param_update_ratios.items()
        }
        for name, flag in (("keep_mask", keep_mask), ("include_embedding", include_embedding),
                           ("include_lm_head", include_lm_head)):  # fmt: skip
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        for name, flag in (("fused", fused), ("foreach", foreach)):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool or None, got {type(flag).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _, named = named_parameters_of(named_parameters_list)
        self._names = {p: name for name, p in named}
        self.mask_mode = mask_mode
        self.keep_mask = keep_mask
        self.include_embedding = include_embedding
        self.verbose = verbose
        self._backend = backend
        self._global_step = 0

        if not include_embedding:
            self._freeze_first(named, "embed", "include_embedding")
        if not include_lm_head:
            self._freeze_first(named, "lm_head", "include_lm_head")
        # badam draws one seed per named parameter, in order, from torch's global RNG; drawing
        # them the same way gives its masks and leaves the global RNG where badam leaves it.
        entries = {}
        for name, p in named:
            seed = int(torch.randint(0, 1000, (1,)).item())
            ratio = self.update_ratio
            for fragment, fragment_ratio in ratios.items():
                if fragment in name:
                    ratio = fragment_ratio
            entries[p] = _Entry(name, p.numel(), ratio, seed)

        defaults = (
            dict(lr=lr, betas=betas, eps=eps) if optimizer_defaults is None else dict(optimizer_defaults)
        )
        super().__init__(param_groups, defaults)
        for index, group in enumerate(self.param_groups):
            missing = [key for key in ("lr", "betas", "eps") if key not in group]
            if missing:
                raise ValueError(
                    f"param group {index} has no {', '.join(missing)}: give them in the group or in "
                    "optimizer_defaults"
                )
            _check_hyperparameters(group["lr"], group["betas"], group["eps"], 0.0)

        grouped = {p for group in self.param_groups for p in group["params"]}
        for p in grouped:
            if p.requires_grad and p not in entries:
                raise ValueError(
                    f"a trainable parameter of shape {tuple(p.shape)} is in param_groups but not in "
                    "named_parameters_list"
                )
        # The parameters badam hooks: named, still trainable, and (here) in a group to update.
        self._entries = {p: e for p, e in entries.items() if p.requires_grad and p in grouped and e.numel > 0}
        for p, entry in self._entries.items():
            if not p.is_contiguous():
                raise ValueError(f"parameter {entry.name!r} is not contiguous; the fused kernels need it")
        dtypes = {p.dtype for p in self._entries}
        _check_master_options(master_weights, False, dtypes)
        self._master_modes = {dtype: master_mode(master_weights, False, dtype) for dtype in dtypes}
        self._hooks = [p.register_post_accumulate_grad_hook(weak_method_hook(self, "_take_gradient"))
                       for p in self._entries]  # fmt: skip
        self._take_over({p: entry.name for p, entry in self._entries.items()})  # one optimizer per parameter
        self._own: dict[torch.Tensor, Selection] = {}  # each parameter's own mask this period
        self._shared: dict[tuple, Selection] = {}  # keep_mask: the mask of a (shape, ratio, device)
        self._shared_owner: dict[tuple, torch.Tensor] = {}
        self._step_selection: dict[torch.Tensor, Selection] = {}  # the mask each parameter uses now
        self._pending: dict[torch.Tensor, torch.Tensor] = {}  # compact gradients awaiting step()
        self._grad_mul: torch.Tensor | None = None  # set by clip_grad_norm_ for the next step

    @staticmethod
    def _freeze_first(named, fragment: str, flag: str) -> None:
        """badam freezes the first parameter whose name contains `fragment`."""
        for name, p in named:
            if fragment in name:
                p.requires_grad_(False)
                return
        warnings.warn(
            f"{flag}=False but no parameter name contains {fragment!r}: nothing was frozen (badam "
            "would fail here)",
            stacklevel=3,
        )

    # ---- masks ---------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Steps taken so far (badam's attribute)."""
        return self._global_step

    def _own_selection(self, p: torch.Tensor) -> Selection:
        """`p`'s own mask for this period, built once (the scatter permutation is the cost)."""
        selection = self._own.get(p)
        if selection is None:
            e = self._entries[p]
            if self.mask_mode == "adjacent":
                selection = adjacent_selection(e.numel, e.count, e.offset)
            else:
                selection = scatter_selection(e.numel, e.count, e.offset, e.seed, p.device)
            self._own[p] = selection
        return selection

    def _share_key(self, p: torch.Tensor) -> tuple:
        """Parameters with equal keys share one mask under keep_mask (badam keys by shape only,
        then fails when ratios differ)."""
        return tuple(p.shape), self._entries[p].ratio, p.device

    def _choose_selection(self, p: torch.Tensor) -> Selection:
        """badam's rule for the mask `p` uses at this step (its hook, run once per step here)."""
        entry = self._entries[p]
        if entry.ratio == 1.0:
            return Selection(runs=((0, entry.numel),))
        if not self.keep_mask:
            return self._own_selection(p)
        key = self._share_key(p)
        selection = self._shared.get(key)
        if selection is None:
            selection = self._own_selection(p)
        if self._last_step_of_period():
            # badam forgets the shared mask after each use at a period's last step, so every
            # parameter of the shape but the first builds its own there.
            self._shared.pop(key, None)
            self._shared_owner.pop(key, None)
        elif key not in self._shared:
            self._shared[key] = selection
            self._shared_owner[key] = p
        return selection

    def _last_step_of_period(self) -> bool:
        return (self._global_step + 1) % self.switch_every == 0

    def _take_gradient(self, p: torch.Tensor) -> None:
        """The post-accumulate-grad hook: keep the selected entries, free the dense gradient."""
        selection = self._step_selection.get(p)
        if selection is None:
            selection = self._step_selection[p] = self._choose_selection(p)
        entry = self._entries[p]
        with torch.no_grad():
            flat = p.grad.reshape(-1)
            whole = entry.ratio == 1.0
            compact = flat if whole else selection.gather(flat)
            if whole or entry.numel < self.preserve_threshold:
                compact.add_(GRADIENT_NUDGE)  # in the gradient's dtype, as badam adds it
            pending = self._pending.get(p)
            self._pending[p] = compact if pending is None else pending.add_(compact)
        p.grad = None

    # ---- the step ------------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients taken since the last step (the selected entries; the dense ones
        are gone) to a total L2 norm of `max_norm`, like torch.nn.utils.clip_grad_norm_ on
        badam's sparse gradients. The factor is applied inside the next step() on the device,
        without a host sync. Returns the total norm (0-dim fp32 tensor)."""
        if float(norm_type) != 2.0:
            raise ValueError(f"only the L2 norm (norm_type=2) is supported, got {norm_type!r}")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a positive float, got {max_norm!r}")
        if not self._pending:
            raise RuntimeError(
                "clip_grad_norm_ found no gradient: call it after backward() and before step()"
            )
        grads = list(self._pending.values())
        device = grads[0].device
        by_device = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        squares = [grad_norm(gs, backend=self._backend).to(device).square() for gs in by_device.values()]
        total = torch.stack(squares).sum().sqrt()
        self._grad_mul = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        return total

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The Adam state of `p`'s selected entries, allocated at the first step of a period."""
        state = self.state[p]
        if not state:
            count = self._pending[p].numel()
            state["step"] = 0
            state["exp_avg"] = torch.zeros(count, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(count, dtype=torch.float32, device=p.device)
            mode = self._master_modes[p.dtype]
            if mode == "fp32":
                state["master"] = self._step_selection[p].gather(p.detach().reshape(-1)).float()
            elif mode == "remainder":  # remainder 0: the master starts at the bf16 value
                state["remainder"] = torch.zeros(count, dtype=torch.int16, device=p.device)
        return state

    def _remove_hooks(self) -> None:
        """A newer optimizer took over (some of) these parameters: remove the gradient hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """SparseAdam on every parameter's selected entries; a new mask period when due."""
        self._check_in_charge()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    name = self._names.get(p, f"of shape {tuple(p.shape)}")
                    raise RuntimeError(
                        f"parameter {name} has a dense gradient that BlockOptimizerRatio did not take: it "
                        "was frozen (or not in named_parameters_list) when the optimizer was built"
                    )
        if not self._pending:
            raise RuntimeError(NO_GRAD_MESSAGE)
        self._update()
        self._pending = {}
        self._grad_mul = None
        self._global_step += 1
        if self._global_step % self.switch_every == 0:
            self._next_period()
        self._step_selection = {}
        return loss

    def _update(self) -> None:
        """One sparse_adam_ call per (group, device, dtype, Adam step, indexed or not)."""
        calls: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in self._pending:
                    state = self._state_of(p)
                    state["step"] += 1
                    indexed = self._step_selection[p].index is not None
                    calls[(group_index, p.device, p.dtype, state["step"], indexed)].append(p)
        for (group_index, device, dtype, step, indexed), ps in calls.items():
            group = self.param_groups[group_index]
            mode = self._master_modes[dtype]
            master_key = {"fp32": "master", "remainder": "remainder"}.get(mode)
            args = defaultdict(list)
            for p in ps:
                state = self.state[p]
                compact = [self._pending[p], state["exp_avg"], state["exp_avg_sq"]]
                if master_key is not None:
                    compact.append(state[master_key])
                selection = self._step_selection[p]
                for piece, (grad, exp_avg, exp_avg_sq, *master) in selection.pieces(
                    p.detach().view(-1), compact
                ):
                    args["params"].append(piece)
                    args["grads"].append(grad)
                    args["exp_avgs"].append(exp_avg)
                    args["exp_avg_sqs"].append(exp_avg_sq)
                    args["masters"].extend(master)
                    if indexed:
                        args["indices"].append(selection.index)
            sparse_adam_(
                args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                indices=args["indices"] or None, lr=float(group["lr"]), beta1=float(group["betas"][0]),
                beta2=float(group["betas"][1]), eps=float(group["eps"]), step=step, master_weights=mode,
                masters=args["masters"] or None, grad_mul=self._grad_multiplier(group, device),
                backend=self._backend,
            )  # fmt: skip

    def _grad_multiplier(self, group: dict[str, Any], device: torch.device) -> torch.Tensor | None:
        """The clip factor from clip_grad_norm_, negated for a group with maximize=True."""
        sign = -1.0 if group.get("maximize", False) else 1.0
        if self._grad_mul is None:
            return None if sign == 1.0 else torch.tensor(sign, device=device)
        return (self._grad_mul * sign).to(device)

    def _next_period(self) -> None:
        """badam's period end: fresh Adam state; each parameter that took a gradient at the last
        step moves its offset on by its count."""
        self.state = defaultdict(dict)
        for p in self._step_selection:
            entry = self._entries[p]
            if entry.ratio < 1.0:
                entry.offset = (entry.offset + entry.count) % entry.numel
                self._own.pop(p, None)
        if self.verbose >= 1:
            log.info("BAdam ratio: mask period %d begins", self._global_step // self.switch_every)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops gradients taken since the last step (and a pending clip factor)."""
        super().zero_grad(set_to_none)
        self._pending = {}
        self._grad_mul = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the hooks and masks are set up for the initial groups."""
        if getattr(self, "_entries", None) is not None:
            raise RuntimeError(
                "BlockOptimizerRatio does not support add_param_group: build a new optimizer over all "
                "the parameters"
            )
        super().add_param_group(param_group)

    # ---- checkpoints and introspection ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus the mask schedule under "ratio_schedule": the step
        count, each parameter's offset and seed, and which parameter's mask each shape shares,
        so that a resumed run is bit-identical to an uninterrupted one."""
        if self._pending:
            raise RuntimeError("state_dict() between backward() and step() would lose the gradients taken")
        state_dict = super().state_dict()
        state_dict["ratio_schedule"] = {
            "global_step": self._global_step,
            "offsets": {e.name: e.offset for e in self._entries.values()},
            "seeds": {e.name: e.seed for e in self._entries.values()},
            "shared_owners": [self._entries[p].name for p in self._shared_owner.values()],
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore Adam state, masters, hyperparameters and the mask schedule (offsets, seeds,
        shared masks, step count), keeping the fp32/int16 state dtypes (torch's loader would
        cast them to the parameter dtype)."""
        self._check_in_charge()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        if "ratio_schedule" not in state_dict:
            raise ValueError(
                "the state dict has no 'ratio_schedule': it was not saved by BlockOptimizerRatio"
            )
        optimizer_state.check_param_groups(self, state_dict)
        schedule = state_dict["ratio_schedule"]
        by_name = {e.name: (p, e) for p, e in self._entries.items()}
        if set(schedule["offsets"]) != set(by_name):
            raise ValueError("the state dict was saved for other trainable parameters (their names differ)")
        for name, (_, entry) in by_name.items():
            entry.offset = schedule["offsets"][name]
            entry.seed = schedule["seeds"][name]
        self._global_step = schedule["global_step"]
        self._own, self._shared, self._shared_owner, self._step_selection, self._pending = {}, {}, {}, {}, {}
        self._grad_mul = None
        for name in schedule["shared_owners"]:
            p = by_name[name][0]
            self._shared[self._share_key(p)] = self._own_selection(p)
            self._shared_owner[self._share_key(p)] = p
        optimizer_state.restore_state(self, state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def memory_summary(self) -> dict[str, int]:
        """Bytes held now: Adam state (exp_avg, exp_avg_sq), masters/remainders, gradients taken
        and not yet applied, scatter-mask indices, and the entries selected this period."""
        state_bytes, master_bytes = optimizer_state.state_bytes(self)
        indices = {
            id(s.index): s.index for s in [*self._own.values(), *self._shared.values()] if s.index is not None
        }
        return {
            "state_bytes": state_bytes,
            "master_bytes": master_bytes,
            "grad_bytes": sum(g.numel() * g.element_size() for g in self._pending.values()),
            "index_bytes": sum(t.numel() * t.element_size() for t in indices.values()),
            "selected_numel": sum(e.count for e in self._entries.values()),
        }
