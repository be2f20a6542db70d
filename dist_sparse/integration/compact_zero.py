"""Compact training state under DeepSpeed ZeRO (``sparsity.compact_state: true``): the shared part and stages 1/2.

:class:`PackedZeroState` is what every stage shares (packed masters, moments and gradients of one rank's
partition, repacking at mask updates, checkpoint loading); :class:`CompactZeroState` maps DeepSpeed's ZeRO-1/2
optimizer onto it (below), :class:`dist_sparse.integration.compact_zero3.CompactZero3State` the ZeRO-3 one.

Dense DeepSpeed keeps, per rank and optimizer group, an fp32 master partition, Adam moments of the same size and
a gradient partition. With compact state this rank keeps them only for *active* positions (mask set, or the
parameter is not sparsified; with ``freeze.fraction`` only for trainable ones: active and not frozen), packed in
the order of the mask bits (:class:`dist_sparse.compact.PackedPartition`):

- master weights: the inner torch optimizer steps one packed fp32 tensor per group instead of DeepSpeed's
  ``single_partition_of_fp32_groups[i]``; the dense fp32 partition is freed. Its slot in DeepSpeed is re-pointed
  at the low-precision partition itself, so DeepSpeed's "copy fp32 -> lp partition" becomes a self-copy and its
  all-gather keeps working unchanged;
- Adam moments: created by the optimizer on the packed tensor, so they are packed too;
- gradients: only active gradients are reduced (:mod:`dist_sparse.integration.compact_reduce`): each rank packs
  the active values of its local gradient by a replicated copy of the full masks, one all-reduce of the packed
  values per step, and keeps its partition's part, packed. On a step that uses the dense gradient (RigL grows by
  |dense gradient|) DeepSpeed reduces densely and ``copy_grads_in_partition`` (called after each bucket) keeps
  this rank's dense range instead, a transient freed by the step;
- the step (``step`` of the ZeRO optimizer instance, replaced): gradient norm over the packed gradients (zeros of
  pruned positions would add nothing), DeepSpeed's own ``unscale_and_clip_grads``, the inner optimizer step on
  packed tensors, packed master -> low-precision partition (inactive positions exactly 0), DeepSpeed's all-gather.
  With layers on the block-sparse kernel, :mod:`dist_sparse.integration.packed_weights` replaces that partition
  and all-gather by a packed buffer holding those layers' weights as their active values only
  (:meth:`CompactZeroState.enable_packed_weights`).

Elementwise Adam on the active positions with the same clipped gradient is what masked-dense DeepSpeed computes,
so the trajectory equals the masked-dense one up to floating-point reassociation of the norm
(``tests/test_compact_state.py``). Mask updates repack (:meth:`CompactZeroState.repack`): survivors keep master
and moments bit for bit, regrown positions start at 0 with zero moments, dropped ones disappear.

This module does not import deepspeed; it knows the attributes of ``DeepSpeedZeroOptimizer``
(``deepspeed/runtime/zero/stage_1_and_2.py``) and keeps that knowledge here.
"""

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from dist_sparse.compact.packed import Fragment, PackedPartition
from dist_sparse.config import ConfigError
from dist_sparse.integration import patches
from dist_sparse.integration.compact_reduce import PackedReduction, skip_buckets
from dist_sparse.integration.views import ADAM_KEYS, ParamView, inner_optimizer
from dist_sparse.masks.packing import pack_bits
from dist_sparse.step import Component

KEY = "sparsity.compact_state"


class CompactView(ParamView):
    """A parameter's range in this rank's partition, stored packed. Same interface as the view it replaces
    (:class:`FragmentView` at ZeRO-1/2, :class:`Stage3View` at ZeRO-3), same mask and score ranges;
    ``master()``/``state()`` materialise the dense range (a new tensor: reads only), ``grad()`` is the dense range
    on mask-update steps and the packed active values otherwise."""

    def __init__(self, base: ParamView, store, group: int | None):
        super().__init__(base.name, base.param)
        self.base = base  # model-side operations (zero_model_, model) stay the replaced view's
        self.model_needs_full_mask = base.model_needs_full_mask
        self.mask_start, self.mask_len = base.mask_start, base.mask_len
        self.score_start, self.score_len = base.score_start, base.score_len
        self.compact = self.store = store
        self.group = group
        if group is None:
            self._empty = torch.zeros(0, dtype=torch.float32, device=base.param.device)

    def zero_model_(self, mask, full_mask=None):
        shards = getattr(self.compact, "shards", None)
        if shards is not None and shards.is_packed(self.param):
            return  # a packed shard stores no pruned position (compact state is masked by its layout only)
        weights = getattr(self.compact, "packed_weights", None)
        if weights is not None and weights.is_held(self.param):
            return  # a weight held as its active blocks stores no pruned position either
        self.base.zero_model_(mask, full_mask)

    def model(self):
        return self.base.model()

    def _packed(self, key=None):
        return self.compact.packed(self.group, self.name, key)

    def _layout(self):
        """The mask the packed values are laid out by: the trainable positions (active, not frozen); None for a
        dense parameter, every position stored."""
        return self.compact.layout_mask(self.name) if self.name in self.compact.sparsifier.order else None

    def master(self):
        if self.group is None:
            return self._empty
        out = PackedPartition.unpack_fragment(self._packed(), self._layout(), torch.float32)
        frozen = self.compact.sparsifier.frozen_mask(self.name)
        if frozen is not None:  # not packed: their values are the model's own weights (exact in fp32, see below)
            out[frozen.to(out.device)] = self.compact.frozen_values(self.group, self.name)
        return out

    def state(self, key):
        if self.group is None:
            return self._empty
        packed = self._packed(key)
        return None if packed is None else PackedPartition.unpack_fragment(packed, self._layout())

    def grad(self):
        if self.group is None:
            return self._empty
        return self.compact.grad_of(self.group, self.name)

    def _keep(self, mask):
        """``mask`` restricted to the active positions, in packed order."""
        layout = self._layout()
        mask = mask.reshape(-1)
        return mask if layout is None else mask[layout.to(mask.device)]

    def mul_grad_(self, mask):
        """On a mask-update step the dense gradient is masked like :class:`FragmentView` does; otherwise the
        packed gradient holds exactly the positions of the current mask (the only mask this is called with)."""
        if self.group is None or not self.compact.dense_grad_step:
            return
        g = self.grad()
        if g is not None:
            g.masked_fill_(~mask.reshape(-1).to(g.device), 0)

    def mul_master_(self, mask):
        if self.group is not None and getattr(self.compact, "master_in_lp", False):  # ZeRO-3 fp32: in the lp shard
            self.compact.mask_lp_fragment(self.group, self.name, mask)
        elif self.group is not None:
            values = self._packed()
            values.masked_fill_(~self._keep(mask).to(values.device), 0)

    def zero_state_(self, positions):
        if self.group is None:
            return
        for key in ADAM_KEYS:
            values = self._packed(key)
            if values is not None:
                values.masked_fill_(self._keep(positions).to(values.device), 0)

    def add_grad_(self, delta):
        """A method's gradient term: on a dense-gradient step added to the dense range, otherwise packed by the
        mask (pruned positions are not stored)."""
        if self.group is None:
            return
        g = self.grad()
        if g is not None:
            delta = delta.reshape(-1).to(g.device, g.dtype)
            g.add_(delta if self.compact.dense_grad_step else self._keep_values(delta))

    def _keep_values(self, values):
        layout = self._layout()
        return values if layout is None else values[layout.to(values.device)]

    def load(self, master, states: dict):
        """Checkpoint load: take the dense fragment (the sparsifier already holds the loaded mask); the store
        packs it and installs all groups in :meth:`PackedZeroState.finish_load`."""
        if self.group is not None:
            self.compact.stage_load(self.group, self.name, master, states)


def combine_grad_norm_groups(norm_groups: list) -> torch.Tensor:
    """DeepSpeed's ``combine_grad_norm_groups``: the L2 norm of the group norms; a negative (DeepSpeed's -1
    sentinel for inf/NaN) or non-finite one makes the result +inf."""
    stacked = torch.stack([n if torch.is_tensor(n) else torch.tensor(float(n)) for n in norm_groups])
    combined = torch.linalg.vector_norm(stacked, ord=2)
    invalid = (~torch.isfinite(stacked) | (stacked < 0)).any()
    return torch.where(invalid, torch.full_like(combined, float("inf")), combined)


def check_common(engine, kind: str) -> None:
    """What every stage's compact state needs: DeepSpeed's ZeRO optimizer ``kind``, no offload, an Adam-family
    inner optimizer. Raised as a ConfigError naming the key."""
    zo = engine.optimizer
    if type(zo).__name__ != kind:
        raise ConfigError(KEY, f"needs DeepSpeed's {kind}, the engine runs {type(zo).__name__} (ZeRO-1 with bf16 "
                               "uses BF16_Optimizer: use ZeRO-2)")
    if getattr(zo, "cpu_offload", False) or getattr(zo, "offload_optimizer", False):
        raise ConfigError(KEY, "is not supported with zero_optimization.offload_optimizer")
    name = type(inner_optimizer(engine)).__name__
    if "adam" not in name.lower():
        raise ConfigError(KEY, f"supports Adam/AdamW, not {name}")


class PackedZeroState(Component, ABC):
    """Packed master weights, moments and gradients of one engine, one :class:`PackedPartition` per optimizer
    (sub-)group of this rank's partition. A stage's subclass fills ``parts`` (the layout), ``lp_parts`` (the
    low-precision partition each part maps onto: what the model's weights are refreshed from) and ``where``
    (id(param) -> (group, name)), installs the packed masters (:meth:`_set_group_tensor`), hooks DeepSpeed and
    ends with :meth:`_make_views`.

    It is the sparsifier's storage (``masks_changed`` repacks, ``enforce`` has nothing to zero: pruned positions
    are not stored) and a step component (it reports what it holds; its work happens inside DeepSpeed's hooks,
    which it replaced).

    Frozen weights (``freeze.fraction``, FreezeNet): the store packs by the *trainable* set (active and not
    frozen, :meth:`layout_mask`), so a frozen weight has no master, no moments and no gradient here, and the
    packed reduction does not send it. Its value lives only in the low-precision weights the model already holds:
    every write of packed values into them leaves frozen positions as they are (``scatter_into``'s ``keep``). That
    is exact: DeepSpeed builds its fp32 masters by upcasting the low-precision weights, and freezing happens before
    the first step, so a frozen weight's fp32 value is its low-precision value upcast (:meth:`frozen_values`, what
    the checkpoint saves as its master, bit-equal to masked-dense's kept copy)."""

    name = "compact"
    holds_frozen_values = True  # the sparsifier keeps no copy of them (Sparsifier.set_frozen)

    def __init__(self, engine, sparsifier):
        self.engine = engine
        self.zo = engine.optimizer
        self.opt = inner_optimizer(engine)
        self.sparsifier = sparsifier
        self.schedule = sparsifier.schedule
        self.views: dict = {}  # name -> CompactView, every trainable parameter
        self.parts: list = []
        self.lp_parts: list = []
        self.where: dict = {}
        self.masters: list = []  # the packed fp32 master tensor of each group (what the inner optimizer steps)
        self.grads: list = []  # packed gradients, lp dtype, between backward and step
        self.dense_grads: dict = {}  # name -> dense range gradient, on mask-update steps only
        self.dense_grad_step = False
        self.transient_dense_grad_bytes = 0
        self.dense_nonfinite = False  # this step's dense gradient had an inf/NaN (take_grads_fp32)
        self.grad_dtype = None  # dtype of the stored gradients (None: the reduced gradient's own)
        # called as f(old master, new master, repack) when a mask update repacks a group: state laid out like the
        # packed master outside this store (gradient compression's staged Adam second moment) follows the layout
        self.layout_followers: list = []
        self._pending: dict = {}
        self._layout_bits = None  # name -> packed trainable bits of this rank's range (only with frozen weights)

    def _make_views(self, param_views: list) -> None:
        """Views of every trainable parameter over the packed values (same names and ranges as ``param_views``)."""
        groups = {f.name: i for i, part in enumerate(self.parts) for f in part.fragments}
        self.views = {v.name: CompactView(v, self, groups.get(v.name)) for v in param_views}

    # -- as the sparsifier's storage ---------------------------------------------------------------------------
    def masks_changed(self, sparsifier, old: dict) -> None:
        # the packed layout is the trainable set; frozen bits never change with a mask update (select_survivors)
        self.repack({n: self._trainable(n, m) for n, m in old.items()})

    def enforce(self, sparsifier) -> None:
        pass  # only active positions are stored: nothing to zero after the optimizer step

    def restore_frozen(self, sparsifier) -> None:
        pass  # frozen weights are not packed: the optimizer never sees them, nothing moved them

    # -- the packed layout: trainable positions ----------------------------------------------------------------
    def _trainable(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        frozen = self.sparsifier.frozen_mask(name)
        return mask if frozen is None else mask & ~frozen.to(mask.device)

    def layout_mask(self, name: str) -> torch.Tensor:
        """The positions of this rank's range of sparsified ``name`` that are packed: active and not frozen."""
        return self.sparsifier.trainable_mask(name)

    def layout_bits(self) -> dict:
        """name -> packed bits of :meth:`layout_mask` (what the packed reduction builds full layouts from): the
        sparsifier's mask bits themselves when nothing is frozen, else kept (1 bit per weight of this rank's
        ranges) until the next mask change or load."""
        if not self.sparsifier.frozen:
            return self.sparsifier.packed
        if self._layout_bits is None:
            self._layout_bits = {n: pack_bits(self.layout_mask(n)) for n in self.sparsifier.order}
        return self._layout_bits

    def lp_fragment(self, i: int, name: str) -> torch.Tensor:
        """The dense low-precision range of ``name`` in group ``i``'s partition."""
        part = self.parts[i]
        f = part.fragments[part.index[name]]
        return self.lp_parts[i].narrow(0, f.start, f.length)

    def frozen_values(self, i: int, name: str) -> torch.Tensor:
        """The frozen positions' values of ``name`` (fp32, in position order): its low-precision weights upcast."""
        lp = self.lp_fragment(i, name)
        return lp[self.sparsifier.frozen_mask(name).to(lp.device)].to(torch.float32)

    def frozen_keep(self, i: int) -> dict | None:
        """``scatter_into``'s ``keep`` for group ``i``: the frozen positions of its fragments (None: none)."""
        if not self.sparsifier.frozen:
            return None
        out = {}
        for f in self.parts[i].fragments:
            frozen = self.sparsifier.frozen_mask(f.name) if f.sparse and f.length else None
            if frozen is not None:
                out[f.name] = frozen
        return out

    # -- as a step component -------------------------------------------------------------------------------------
    def bytes_held(self) -> dict:
        held = {"gradients": [*self.grads, *self.dense_grads.values()]}
        masks = 0
        if self._layout_bits is not None:  # frozen weights: the trainable bits the packed reduction lays out by
            masks += sum(b.numel() for b in self._layout_bits.values())
        reduction = getattr(self, "reduction", None)
        if reduction is not None:  # the packed reduction's kept full masks (replicate_masks) and its open buffer
            masks += reduction.mask_bytes()
            held["gradients"].append(reduction.buffer)
        if masks or reduction is not None:
            held["masks"] = masks
        return held

    # -- master weights and moments ----------------------------------------------------------------------------
    @abstractmethod
    def _install_slot(self, i: int, packed: torch.Tensor) -> None:
        """Make DeepSpeed's optimizer step ``packed`` as group ``i``'s master (the slot of its dense one)."""

    def _set_group_tensor(self, i: int, packed: torch.Tensor, state: dict) -> None:
        old = self.masters[i] if i < len(self.masters) else None
        packed.requires_grad_(True)
        if old is not None:
            self.opt.state.pop(old, None)
            self.masters[i] = packed
        else:
            self.masters.append(packed)
        self._install_slot(i, packed)
        if state:
            self.opt.state[packed] = state

    def master_tensor(self, i: int) -> torch.Tensor:
        return self.masters[i]

    def packed(self, i: int, name: str, key=None):
        t = self.master_tensor(i)
        if key is not None:
            t = self.opt.state.get(t, {}).get(key)
            if t is None:
                return None
        return self.parts[i].slice(t.data if key is None else t, name)

    def master_slice(self, i: int, name: str) -> torch.Tensor:
        """``name``'s slice of group ``i``'s packed master, a view of the tensor the optimizer steps (gradient
        compression's Adam momentum correction stages its second moment by that storage)."""
        return self.packed(i, name)

    @torch.no_grad()
    def repack(self, old_masks: dict) -> None:
        """After a mask update (the sparsifier holds the new masks): survivors keep values and moments exactly,
        regrown positions start at 0 with zero moments, dropped positions are removed."""
        for i, part in enumerate(self.parts):
            old = [old_masks[f.name] if f.sparse else None for f in part.fragments]
            new = part.masks()
            master = self.master_tensor(i)
            state = dict(self.opt.state.get(master, {}))
            for key in ADAM_KEYS:
                if key in state:
                    state[key] = part.repack(state[key], old, new)
            packed = part.repack(master.detach(), old, new)
            if not self.dense_grad_step and self.grads[i] is not None:
                # an update on a step reduced packed (magnitude pruning, SET: no dense gradient needed): the
                # step's gradient follows the new layout; pruned positions' values are dropped as masked-dense
                # zeroes them, regrown ones (SET, whose update replaces the step) get 0
                self.grads[i] = part.repack(self.grads[i], old, new)
            for follow in self.layout_followers:
                follow(master, packed, lambda t, part=part, old=old, new=new: part.repack(t, old, new))
            part.relayout(new)
            self._layout_bits = None
            self._set_group_tensor(i, packed, state)
            # the lp weights: dropped positions become 0 now (the step writes active ones)
            self._write_lp(i, packed, new)

    def _write_lp(self, i: int, packed: torch.Tensor, masks: list) -> None:
        """Packed master of group ``i`` (laid out by ``masks``) -> the low-precision partition, inactive positions
        exactly 0 but frozen ones kept (ZeRO-3 with packed shards: the packed low-precision values)."""
        self.parts[i].scatter_into(packed, self.lp_parts[i], masks, self.frozen_keep(i))

    # -- checkpoint load ---------------------------------------------------------------------------------------
    def stage_load(self, i: int, name: str, master: torch.Tensor, states: dict) -> None:
        part = self.parts[i]
        frag = part.fragments[part.index[name]]
        mask = part.mask_of(name).reshape(-1) if frag.sparse else None
        self._pending[name] = {k: part.pack_fragment(v.reshape(-1), mask) for k, v in [("master", master),
                                                                                        *states.items()]}
        frozen = self.sparsifier.frozen_mask(name) if frag.sparse else None
        if frozen is not None:  # not packed: the saved masters go straight into the model's weights
            lp = self.lp_fragment(i, name)
            where = frozen.to(lp.device)
            lp[where] = master.reshape(-1).to(lp.device)[where].to(lp.dtype)

    @torch.no_grad()
    def finish_load(self) -> None:
        """Install the staged (packed) values of every group, laid out by the loaded masks."""
        for i, part in enumerate(self.parts):
            missing = [f.name for f in part.fragments if f.length and f.name not in self._pending]
            if missing:
                raise KeyError(f"checkpoint load: no values staged for {missing[0]}")
            part.relayout()
            self._layout_bits = None
            old = self.master_tensor(i)
            state = dict(self.opt.state.get(old, {}))
            staged = [self._pending.get(f.name, {}) for f in part.fragments]
            keys = {k for s in staged for k in s}
            master = torch.zeros(0, dtype=torch.float32, device=old.device)
            for key in sorted(keys):
                pieces = [s[key] for s in staged if key in s]
                value = torch.cat(pieces) if pieces else torch.zeros(0)
                value = value.to(device=old.device, dtype=torch.float32)
                if key == "master":
                    master = value
                else:
                    state[key] = value
            self._set_group_tensor(i, master, state)
        self._pending = {}

    # -- gradients ---------------------------------------------------------------------------------------------
    def _dense_grad_step(self) -> bool:
        """Whether this step uses the gradients of pruned positions (RigL's update step and, with
        ``grow_grad_steps`` > 1, its growth window): then the dense range is kept (a transient)."""
        return self.schedule.uses_dense_grad(self.engine.global_steps)

    @property
    def reduced_grad_dtype(self) -> torch.dtype:
        """The dtype DeepSpeed stores a reduced partition gradient in (its accumulation dtype)."""
        return getattr(self.zo, "gradient_accumulation_dtype", None) or self.zo.dtype

    @torch.no_grad()
    def capture_grad(self, param, grad, start: int | None = None, accumulate: bool = False) -> None:
        """Keep this rank's range of a reduced gradient: packed, or dense on a mask-update step. ``grad`` is the
        whole parameter's gradient (its range starts at the fragment's ``param_start``) or, with ``start``, a
        tensor whose position ``start`` is the range's first element (ZeRO-3: the rank's shard, ``start=0``).
        ``accumulate``: add to what this accumulation window stored so far (later micro-batches) instead of
        replacing it; the masks do not change inside a window, so the packed layout is the same."""
        where = self.where.get(id(param))
        if where is None or grad is None:
            return
        i, name = where
        frag = self.parts[i].fragments[self.parts[i].index[name]]
        dense = grad.reshape(-1).narrow(0, frag.param_start if start is None else start, frag.length)
        self.accept_grad(i, name, dense, self.grad_dtype or grad.dtype, accumulate=accumulate)

    @torch.no_grad()
    def accept_grad(self, i: int, name: str, values: torch.Tensor, dtype: torch.dtype, accumulate: bool = False,
                    packed: bool = False) -> None:
        """Take this rank's averaged range of parameter ``name`` (group ``i``), stored in ``dtype``: the one way
        every reduction hands the store a gradient (DeepSpeed's dense one through :meth:`capture_grad`, the packed
        all-reduce, gradient compression's exchange). ``values``: the dense range (the fragment's ``length``
        values), kept dense on a step that uses the dense gradient (a transient) and packed by the current mask
        otherwise; or, with ``packed``, already the active values in the packed layout (a packed step).
        ``accumulate``: add to what this accumulation window stored so far instead of replacing it."""
        self.dense_grad_step = self._dense_grad_step()
        part = self.parts[i]
        if not packed:
            if self.dense_grad_step:
                if accumulate and name in self.dense_grads:
                    self.dense_grads[name].add_(values.to(dtype))
                else:
                    self.dense_grads[name] = values.to(dtype, copy=True)
                return
            values = self.pack_range(i, name, values)
        if self.grads[i] is None:
            self.grads[i] = torch.zeros(part.numel, dtype=dtype, device=values.device)
        target = part.slice(self.grads[i], name)
        if accumulate:  # as DeepSpeed: the new micro-batch's gradient in the accumulation dtype, added
            target.add_(values.to(dtype))
        else:
            target.copy_(values)

    def pack_range(self, i: int, name: str, dense: torch.Tensor) -> torch.Tensor:
        """A dense range of ``name`` packed by the current layout (what the packed master of that range holds)."""
        part = self.parts[i]
        frag = part.fragments[part.index[name]]
        return part.pack_fragment(dense, part.mask_of(name).reshape(-1) if frag.sparse else None)

    def grad_of(self, i: int, name: str):
        if self.dense_grad_step:
            return self.dense_grads.get(name)
        if self.grads[i] is None:
            return None
        return self.parts[i].slice(self.grads[i], name)

    def _with_dense_nonfinite(self, norm: torch.Tensor) -> torch.Tensor:
        """``norm``, or +inf on every rank when some rank's dense-step gradient had an inf/NaN at a pruned position
        (not in the packed gradients the norm was computed from; DeepSpeed's check sees every position)."""
        if not self._dense_grad_step():
            return norm
        bad = torch.tensor([1.0 if self.dense_nonfinite else 0.0], device=norm.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.zo.dp_process_group)
        return torch.full_like(norm, float("inf")) if bad.item() else norm

    def _packed_grads_fp32(self) -> list:
        out = []
        for i, part in enumerate(self.parts):
            if self.dense_grad_step:  # pack by the (possibly new) masks; params without a gradient: zeros
                lp = self.lp_parts[i]

                def dense_of(k, frags=part.fragments, lp=lp):
                    g = self.dense_grads.get(frags[k].name)
                    return g if g is not None else torch.zeros(frags[k].length, dtype=lp.dtype, device=lp.device)

                out.append(part.pack(dense_of, part.masks(), torch.float32, lp.device))
            elif self.grads[i] is not None:
                out.append(self.grads[i].to(torch.float32))  # the same cast DeepSpeed applies to its flat grad
            else:
                out.append(torch.zeros(part.numel, dtype=torch.float32, device=self.lp_parts[i].device))
        return out

    def take_grads_fp32(self) -> list:
        """The step's packed fp32 gradients (one per group); the stored ones and the dense transient are
        released (the transient's size is kept for ``transient_bytes_per_rank``)."""
        grads = self._packed_grads_fp32()
        # an inf/NaN at a pruned position of a dense-step gradient is not in the packed gradients; DeepSpeed checks
        # every position (and so does SparseEngine's finiteness check), so the step must count it as an overflow
        self.dense_nonfinite = any(not bool(torch.isfinite(g).all()) for g in self.dense_grads.values())
        self.transient_dense_grad_bytes = max(self.transient_dense_grad_bytes, sum(
            g.untyped_storage().nbytes() for g in self.dense_grads.values()))
        self.dense_grads = {}
        self.grads = [None] * len(self.parts)
        return grads

    def _install_hooks(self, **methods) -> None:
        """Replace bound methods on the ZeRO optimizer *instance* (DeepSpeed calls them through ``self``)."""
        for name, fn in methods.items():
            patches.replace(self.zo, name, fn, by=f"compact state ({type(self).__name__})")

    # -- accounting --------------------------------------------------------------------------------------------
    def packed_numel(self) -> int:
        return sum(p.numel for p in self.parts)


class CompactZeroState(PackedZeroState):
    """ZeRO-1/2: DeepSpeed's ``DeepSpeedZeroOptimizer``; installed by :func:`enable`. ``reduce_gradients``:
    whether this store takes over the gradient reduction (the packed all-reduce); False when gradient compression
    owns it (``ds_compression.CompressedReduction`` hands the averaged ranges to :meth:`accept_grad`)."""

    def __init__(self, engine, sparsifier, param_views: list, reduce_gradients: bool = True,
                 replicate_masks: bool = False):
        check_common(engine, "DeepSpeedZeroOptimizer")
        if not getattr(engine.optimizer, "contiguous_gradients", True):
            raise ConfigError(KEY, "needs zero_optimization.contiguous_gradients: true")
        super().__init__(engine, sparsifier)
        zo = self.zo
        names = {id(p): n for n, p in engine.module.named_parameters()}
        for i in range(len(zo.bit16_groups)):
            rank = dist.get_rank(group=zo.real_dp_process_group[i])
            lp_part = zo.parallel_partitioned_bit16_groups[i][rank]
            frags = []
            for p in zo.params_in_partition[i]:
                hm = p._hp_mapping
                name = names[id(p)]
                frags.append(Fragment(name, hm.hp_fragment_address.start, hm.hp_fragment_address.numel,
                                      hm.lp_fragment_address.start, name in sparsifier.order))
                self.where[id(p)] = (i, name)
            self.parts.append(PackedPartition(frags, self.layout_mask))
            self.lp_parts.append(lp_part)
        self.grads = [None] * len(self.parts)
        self.masters = [self.opt.param_groups[i]["params"][0] for i in range(len(self.parts))]
        self.packed_weights = None  # PackedWeights once enable_packed_weights ran (block-sparse kernels)
        self._install_master()
        # only active gradients are reduced outside dense-gradient steps (DeepSpeed's own reduction on those)
        self.reduction = None
        if reduce_gradients:
            self.reduction = PackedReduction(self, self.zo.reduce_independent_p_g_buckets_and_remove_grads,
                                             replicate_masks)
        self._patch()
        self._make_views(param_views)

    def _install_slot(self, i: int, packed: torch.Tensor) -> None:
        self.opt.param_groups[i]["params"] = [packed]

    def enable_packed_weights(self, kernels) -> None:
        """Hold the weights of the layers on block-sparse kernels as their active blocks
        (:mod:`.packed_weights`); nothing happens when no layer can be held or weights are frozen (their values
        live only in the dense low-precision weights)."""
        from dist_sparse.integration.packed_weights import PackedWeights, held_layers

        layers = held_layers(kernels)
        if layers and not self.sparsifier.frozen:
            self.packed_weights = PackedWeights(self, layers)

    def _write_lp(self, i: int, packed: torch.Tensor, masks: list) -> None:
        if self.packed_weights is None:
            super()._write_lp(i, packed, masks)
        # else: the new layout is written for all groups at once when the repack has finished (repack below)

    def repack(self, old_masks: dict) -> None:
        super().repack(old_masks)
        if self.packed_weights is not None:  # the held weights' new blocks: layout, then values from the masters
            self.packed_weights.refresh()

    def bytes_held(self) -> dict:
        held = super().bytes_held()
        if self.packed_weights is not None:  # the packed buffer (also DeepSpeed's bit16_groups_flat now)
            held["weights"] = self.packed_weights.bytes_held()
        return held

    def _install_master(self) -> None:
        """Pack DeepSpeed's fp32 master partitions (already masked) and free them."""
        zo = self.zo
        for i, part in enumerate(self.parts):
            dense = zo.single_partition_of_fp32_groups[i]
            masks = part.masks()
            packed = part.pack(lambda k, d=dense, f=part.fragments: d.narrow(0, f[k].start, f[k].length),
                               masks, torch.float32, dense.device)
            self._set_group_tensor(i, packed, {})
            # DeepSpeed copies "fp32 partition -> lp partition" after its step and in update_lp_params: aliasing
            # the slot to the lp partition makes that a self-copy. The dense fp32 tensor has no owner left.
            zo.single_partition_of_fp32_groups[i] = self.lp_parts[i]
        for group in zo.bit16_groups:
            for p in group:
                hm = getattr(p, "_hp_mapping", None)
                if hm is not None:  # its hp_fragment views the freed dense partition (would keep it alive)
                    hm.hp_fragment = None
                    hm.optim_fragment = {}

    # -- DeepSpeed hooks ---------------------------------------------------------------------------------------
    def _patch(self) -> None:
        zo, store, reduction = self.zo, self, self.reduction

        def copy_grads_in_partition(param, group_idx=None):
            # only on dense-gradient steps (DeepSpeed's reduction ran): keep this rank's dense range, summed over
            # the micro-batches of the window (stage 2 reduces each; the step releases it)
            store.capture_grad(param, zo.get_gradient_for_reduction(param), accumulate=True)
            zo.clear_grad_attribute(param)  # the dense gradient (a view of DeepSpeed's bucket) is not kept

        def independent_gradient_partition_epilogue():
            # DeepSpeed's epilogue without building dense ``averaged_gradients``: the packed ones are ours
            store.dense_grad_step = store._dense_grad_step()
            # reduction None: gradient compression reduces at the step boundary (and calls accept_grad)
            if reduction is not None and store.dense_grad_step:
                zo.reduce_ipg_grads()  # DeepSpeed's dense reduction (RigL's growth needs the dense gradient)
            elif reduction is not None:  # the packed all-reduce of active gradients (compact_reduce.py)
                reduction.end_backward(self.engine.is_gradient_accumulation_boundary())
            for k in range(len(zo.params_already_reduced)):
                zo.params_already_reduced[k] = False
            if zo.overlap_comm:  # as DeepSpeed: wait for the reduction stream before freeing other ranks' grads
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                zo._clear_previous_reduced_grads()
            zo._release_ipg_buffers()
            zo._clear_param_grad_only()
            zo._epilogue_ran_this_backward = True

        # with compression nothing enters DeepSpeed's buckets on any step: only their bookkeeping runs
        hooks = reduction.install() if reduction is not None else {"setup_buckets": lambda: skip_buckets(zo)}
        self._install_hooks(copy_grads_in_partition=copy_grads_in_partition,
                            independent_gradient_partition_epilogue=independent_gradient_partition_epilogue,
                            step=self.step, **hooks)

    def finish_load(self) -> None:
        super().finish_load()
        if self.reduction is not None:
            self.reduction.masks_changed()  # the loaded masks: the reduction's layout is rebuilt
        if self.packed_weights is not None:  # the held weights from the loaded masters, by the loaded masks
            self.packed_weights.refresh()

    @torch.no_grad()
    def step(self, closure=None):
        """DeepSpeed's ZeRO-1/2 step on packed tensors (fp32, bf16, fp16 with its loss scaler; no offload)."""
        zo = self.zo
        zo.micro_step_id = -1  # DeepSpeed's INITIAL_MICRO_STEP_ID
        if self.reduction is not None:  # None: gradient compression reduces
            self.reduction.end_step(self._dense_grad_step())
        grads = self.take_grads_fp32()
        # the global norm exactly as DeepSpeed's scaled_global_norm computes it (its own get_grad_norm_direct per
        # group, in its norm dtype, then the groups combined), handed the packed gradients: masked-dense runs hand
        # it the same active values in the same order (engine._install_masked_grad_norm), so both clip alike
        norm_groups = [zo.get_grad_norm_direct([part.slice(g, f.name) for f in part.fragments], params)
                       for part, g, params in zip(self.parts, grads, zo.params_in_partition)]
        total = self._with_dense_nonfinite(combine_grad_norm_groups(norm_groups))
        # An inf/NaN anywhere in the (fp16: loss-scaled) gradients makes the norm non-finite on every rank, so all
        # ranks agree on the overflow, as with DeepSpeed's all-reduced overflow flag; DeepSpeed's condition (bf16
        # checks only with check_grad_overflow). The loss scaler is updated before unscaling, in DeepSpeed's order
        # (a scale raised this step already divides this step's gradients, as in DeepSpeed). bf16/fp32 have a
        # static scaler of 1, whose update does nothing.
        check = zo.dtype != torch.bfloat16 or getattr(zo, "check_grad_overflow", False)
        zo.overflow = bool(check and not torch.isfinite(total))
        prev_scale = zo.loss_scale
        zo._update_scale(zo.overflow)
        if zo.overflow:  # DeepSpeed's overflow branch: no step, the gradients are dropped
            zo._global_grad_norm = float("inf")
            self.dense_grad_step = False
            return
        zo._global_grad_norm = total / prev_scale
        zo.unscale_and_clip_grads(grads, total)  # DeepSpeed's own clipping arithmetic
        masters = [self.master_tensor(i) for i in range(len(self.parts))]
        for m, g in zip(masters, grads):
            m.grad = g
        self.opt.step()  # wrapped by SparseEngine: skipped on update steps that replace it
        for m in masters:
            m.grad = None
        if self.packed_weights is not None:  # held weights: packed partitions written and exchanged
            self.packed_weights.write_all()
        else:
            for i, (part, m) in enumerate(zip(self.parts, masters)):
                part.scatter_into(m.detach(), self.lp_parts[i], part.masks(), self.frozen_keep(i))
            zo.update_lp_params()  # lp partition (self-copy) + DeepSpeed's all-gather of the partitions
            for i in range(len(self.parts)):
                if hasattr(zo, "_update_model_bit16_weights"):
                    zo._update_model_bit16_weights(i)
        self.dense_grad_step = False
