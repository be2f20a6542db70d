"""Packed gradient reduction for compact state: outside mask-update steps only active gradients are reduced
(docs/memory.md).

DeepSpeed's ZeRO optimizers hand every parameter's gradient to ``reduce_independent_p_g_buckets_and_remove_grads``
(ZeRO-1/2: ``(param, i)``; stage 2 from its gradient hooks after each micro-batch's backward, stage 1 at the
accumulation boundary with the gradient autograd summed over the window in ``param.grad``; ZeRO-3: ``(param)``
from its hooks after each micro-batch, the whole gradient of a gathered parameter). :class:`PackedReduction`
replaces that bound method on the optimizer *instance* (the idea ``ds_compression.py`` uses for gradient
compression):

- on a step whose dense gradient is not used (``StepSchedule.uses_dense_grad(step)`` is False: no RigL update and
  no growth window) the active coordinates of the parameter's *local* gradient are added into one packed buffer
  for the whole model and the dense gradient is dropped at once; nothing enters DeepSpeed's buckets (they are not
  even allocated: ZeRO-1/2's ``setup_buckets`` is replaced too, ZeRO-3's bucket stays released). The buffer
  holds every trainable parameter in DeepSpeed's group order, each one's active positions in increasing order,
  so the layout is identical on every rank. A parameter's active positions are selected by its full mask, built
  just in time when its gradient arrives (:class:`dist_sparse.masks.sharded.MaskSource`: one all-gather of that
  tensor's shard bits, released before the next tensor's; ``sparsity.replicate_masks: true`` keeps the full masks
  of every tensor between mask changes instead, as before issue 18). The layout itself needs only every rank's
  active count per tensor (one small all-gather per mask change). At the accumulation boundary the
  buffer is averaged the way DeepSpeed averages (divided by the data-parallel size, in the communication dtype;
  DeepSpeed's pre/post-divide factors where its path uses them) and all-reduced once; each rank copies the runs of
  its partition's fragments (ZeRO-1/2: fragments of the flat partition, ZeRO-3: the parameters' shards; a
  fragment's active values are contiguous in the buffer) into the stored packed gradient.
- on a step that uses the dense gradient (RigL grows by |dense gradient|), DeepSpeed's own dense reduction runs
  unchanged and the compact store keeps this rank's dense range: the transient reported as
  ``transient_bytes_per_rank.dense_gradient_on_update_steps``.

Gradient accumulation: stage 1 reduces once at the boundary anyway (``param.grad`` is the dense local buffer ZeRO-1
always holds). Stages 2 and 3 sum the micro-batches' active values locally in fp32 (a packed buffer, 4 bytes per
active weight of the model) and reduce once at the boundary; DeepSpeed instead reduces every micro-batch and sums
the reduced values, so the two agree up to reassociation. On dense steps they reduce every micro-batch, as
DeepSpeed does.

Bytes handed to the collectives are counted per optimizer step (``grad_reduce_bytes_per_step`` in summary.json):
the packed all-reduce is ``element size x active count``, a dense step what DeepSpeed's buckets receive
(``element size x numel`` per reduction), and the masks' all-gathers (``mask_sync_bytes_per_step``: per tensor
and packed reduction ``max_r ceil(len_r / 8)``, plus the per-rank counts after a mask change) are counted apart
and included in the total.

Knows the attributes of DeepSpeed's ``DeepSpeedZeroOptimizer`` and ``DeepSpeedZeroOptimizer_Stage3``, does not
import deepspeed.
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.config import ConfigError
from dist_sparse.masks.sharded import MaskSource

KEY = "sparsity.compact_state"


def skip_buckets(zo) -> None:
    """DeepSpeed's ``setup_buckets`` without allocating its reduction buckets (``reduce_bucket_size`` elements,
    allocated before each backward): for steps on which nothing enters them, only its bookkeeping runs."""
    if not zo.ready_for_gradients:
        zo.micro_step_id += 1
        zo.ready_for_gradients = True


class PackedReduction:
    """Takes over the gradient reduction of one engine with compact state (``store``: its
    :class:`dist_sparse.integration.compact_zero.PackedZeroState`). ``dense_reduce`` is what reduces a gradient
    on dense-gradient steps (DeepSpeed's method, or the store's wrapper of it). ``replicate_masks``: keep the
    full masks between mask changes (``sparsity.replicate_masks``) instead of building each tensor's when its
    gradient arrives."""

    def __init__(self, store, dense_reduce, replicate_masks: bool = False):
        zo, engine = store.zo, store.engine
        self.store, self.zo, self.engine, self.sparsifier = store, zo, engine, store.sparsifier
        self.stage3 = engine.zero_optimization_stage() == 3
        self.group = zo.dp_process_group
        self.world = D.world_size(self.group)
        self.device = store.lp_parts[0].device
        names = {id(p): n for n, p in engine.module.named_parameters()}
        groups = zo.fp16_groups if self.stage3 else zo.bit16_groups
        self.names = {}  # id(param) -> name, every parameter DeepSpeed reduces
        self.order = []  # (name, numel) in DeepSpeed's group order: the packed buffer's layout
        for group in groups:
            for p in group:
                if p.requires_grad and id(p) in names:
                    self.names[id(p)] = names[id(p)]
                    self.order.append((names[id(p)], p.ds_numel if self.stage3 else p.numel()))
                    if self.stage3 and D.world_size(p.ds_process_group) != self.world:
                        raise ConfigError(KEY, "needs every ZeRO-3 parameter partitioned over the data-parallel "
                                               "group (no hierarchical partitioning)")
        comm = {zo.get_param_comm_dtype(p) for group in groups for p in group}
        if len(comm) != 1:
            raise ConfigError(KEY, f"needs one gradient communication dtype, DeepSpeed uses {sorted(map(str, comm))}")
        self.comm_dtype = comm.pop()
        # Gradient accumulation at stages 2/3 (DeepSpeed reduces every micro-batch there and sums the reduced
        # values in its accumulation dtype). fp32 communication: sum the micro-batches locally in fp32 and reduce
        # once at the boundary (the same values up to reassociation). Lower-precision communication (bf16): a
        # local sum rounded once differs from DeepSpeed's sum of rounded reductions by more than reassociation,
        # so each micro-batch's packed values are reduced as DeepSpeed reduces them (still packed) and summed.
        accumulate = (self.stage3 or zo.partition_gradients) and engine.gradient_accumulation_steps() > 1
        self.per_micro_batch = accumulate and self.comm_dtype != torch.float32
        self.buffer_dtype = torch.float32 if accumulate and not self.per_micro_batch else self.comm_dtype
        self._window_reductions = 0  # packed reductions already summed into the stored gradient this window
        self.stored_dtype = store.reduced_grad_dtype  # DeepSpeed's partition gradient dtype
        # the full mask of a sparsified parameter, when its gradient arrives (sharded: built from the ranks' bits)
        # (the store's layout: with frozen weights the trainable positions, so frozen gradients are not sent)
        self.masks = MaskSource(self.sparsifier, self.group, self.device, replicate=replicate_masks,
                                bits=store.layout_bits)
        self.offsets: dict = {}  # name -> (offset in the packed buffer, active count)
        self.sources: dict = {}  # (group index, name) -> where the fragment's active values start in the buffer
        self.total = 0
        self._token = None
        self._epoch = 0
        self.buffer = None  # the local packed gradient of the open accumulation window
        self.exchanged = False  # this step's packed all-reduce ran (DeepSpeed may run its epilogue twice)
        # accounting (per rank): bytes handed to the reduction collectives
        self.step_bytes = 0
        self.last_step_bytes = 0
        self.bytes_by_kind = {"packed": 0, "dense": 0}
        self.mask_sync_bytes = 0  # the masks' all-gathers (bits + layout), over the run
        self.last_step_mask_bytes = 0
        self._mask_bytes_seen = 0  # self.masks.sync_bytes() at the end of the previous step
        self.steps_by_kind = {"packed": 0, "dense": 0}
        self.max_buffer_bytes = 0  # the packed buffer (local sum, then the all-reduce): a transient
        self._dense_reduce = dense_reduce
        self._ds_setup_buckets = getattr(zo, "setup_buckets", None)

    def install(self) -> dict:
        """The bound methods to replace on the optimizer instance."""
        if self.stage3:
            return {"reduce_independent_p_g_buckets_and_remove_grads": self.take}
        return {"reduce_independent_p_g_buckets_and_remove_grads": self.take, "setup_buckets": self.setup_buckets}

    # -- which path ------------------------------------------------------------------------------------------------
    def dense_step(self) -> bool:
        """Whether this step's gradients of pruned positions are used (then DeepSpeed reduces densely)."""
        return self.store.schedule.uses_dense_grad(self.engine.global_steps)

    def masks_changed(self) -> None:
        """The masks were replaced outside a mask update (checkpoint load): rebuild the layout (and, with
        replicated masks, the kept copy) before the next use."""
        self._epoch += 1

    def _refresh(self) -> None:
        """The packed buffer's layout for the current masks: every tensor's active count (the sum of the ranks'
        counts) and where each of this rank's fragments starts in it (the counts of the ranks whose ranges lie
        before the fragment: the ranges tile the parameter). A collective on the first call after a change."""
        token = (self.sparsifier.updates_done, self._epoch)
        if token == self._token:
            return
        self._token = token
        self.masks.refresh(token)
        per_rank = self.masks.counts()  # name -> [active count of every rank's range]
        counts = {name: sum(per_rank[name]) if name in self.masks else numel for name, numel in self.order}
        offset = 0
        self.offsets = {}
        for name, _ in self.order:
            self.offsets[name] = (offset, counts[name])
            offset += counts[name]
        self.total = offset
        self.sources = {}
        for i, part in enumerate(self.store.parts):
            for f in part.fragments:
                if f.name in self.masks and f.length:
                    ranges = self.masks.ranges(f.name)
                    if (f.param_start, f.length) not in ranges:
                        raise RuntimeError(f"{KEY}: fragment [{f.param_start}, +{f.length}) of {f.name} is not a "
                                           f"rank's mask range {ranges}")
                    before = sum(c for (s, n), c in zip(ranges, per_rank[f.name]) if n and s < f.param_start)
                else:
                    before = f.param_start
                self.sources[(i, f.name)] = self.offsets[f.name][0] + before

    # -- DeepSpeed hooks -------------------------------------------------------------------------------------------
    def setup_buckets(self):
        """DeepSpeed allocates its reduction buckets (``reduce_bucket_size`` elements) before each backward; on
        packed steps nothing enters them, so only its bookkeeping runs."""
        if self.dense_step():
            return self._ds_setup_buckets()
        return skip_buckets(self.zo)

    def _grad(self, param):
        return param.grad if self.stage3 else self.zo.get_gradient_for_reduction(param)

    @torch.no_grad()
    def take(self, param, *args):
        """Replaces DeepSpeed's bucketing + reduction of one parameter's gradient (see the module docstring)."""
        numel = param.ds_numel if self.stage3 else param.numel()
        if numel == 0:
            return None
        if self.dense_step():  # DeepSpeed's bucket: the whole gradient, in the communication dtype
            if self._grad(param) is not None:
                self.step_bytes += numel * torch.empty(0, dtype=self.comm_dtype).element_size()
            return self._dense_reduce(param, *args)
        grad = self._grad(param)
        name = self.names.get(id(param))
        if grad is None or name is None:
            return None
        self._refresh()
        if self.buffer is None:  # a new accumulation window
            self.buffer = torch.zeros(self.total, dtype=self.buffer_dtype, device=grad.device)
        offset, count = self.offsets[name]
        flat = grad.detach().reshape(-1)
        if name in self.masks:  # sharded masks: a collective, in hook order (the same on every rank)
            flat = flat[self.masks.full(name).to(flat.device)]
        self.buffer.narrow(0, offset, count).add_(flat.to(self.buffer_dtype))
        if self.stage3:  # the dense local gradient is not kept
            param.grad = None
        else:
            self.zo.clear_grad_attribute(param)
        return None

    def end_backward(self, boundary: bool) -> None:
        """Called by the gradient epilogue of a packed step (DeepSpeed may run it twice per backward): reduce at
        the accumulation boundary, or after every micro-batch when reducing per micro-batch."""
        self.masks.release()  # the last tensor's full mask: nothing of the masks stays between backward passes
        if self.per_micro_batch and self.buffer is not None:
            self.exchange()
        elif boundary and not self.per_micro_batch:
            self.exchange()

    @torch.no_grad()
    def exchange(self) -> None:
        """Average the packed local gradients over the ranks (one all-reduce) and store this rank's partition
        part, packed, as the step's gradient (added to it for later micro-batches when reducing per
        micro-batch)."""
        if self.exchanged:
            return
        self._refresh()
        buf = self.buffer
        if buf is None:  # no parameter received a gradient in this window: still take part in the collective
            buf = torch.zeros(self.total, dtype=self.buffer_dtype, device=self.device)
        self.buffer = None
        self.max_buffer_bytes = max(self.max_buffer_bytes, buf.numel() * buf.element_size())
        buf = self._average_and_reduce(buf)
        self.step_bytes += buf.numel() * buf.element_size()
        store = self.store
        add = self._window_reductions > 0  # as DeepSpeed: copy the first micro-batch's reduction, add later ones
        for i, part in enumerate(store.parts):
            if not add:
                store.grads[i] = None  # a new window: the store allocates the step's packed gradient
            for k, f in enumerate(part.fragments):
                n = part.offsets[k + 1] - part.offsets[k]
                if n:
                    src = buf.narrow(0, self.sources[(i, f.name)], n)
                    store.accept_grad(i, f.name, src, self.stored_dtype, accumulate=add, packed=True)
        self._window_reductions += 1
        self.exchanged = not self.per_micro_batch  # once per step, unless every micro-batch reduces

    def _average_and_reduce(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum ``buf`` over the ranks with DeepSpeed's averaging arithmetic (the same scalings, the same order)."""
        zo = self.zo
        predivide = float(getattr(zo, "gradient_predivide_factor", 1.0))
        postscale = getattr(zo, "postscale_gradients", True)
        if self.stage3:  # __avg_scatter_grads: cast, pre-divide, reduce_scatter_coalesced (divides by the world)
            buf = buf.to(self.comm_dtype)
            if postscale and predivide != 1.0:
                buf.div_(predivide)
            buf.div_(self.world)
            D.all_reduce_sum(buf, self.group)
            if postscale and predivide not in (1.0, float(self.world)):
                buf.mul_(predivide)
            return buf
        sp = float(getattr(zo, "sequence_parallel_size", 1))
        if not getattr(zo, "gradient_average", True):
            buf = buf.to(self.comm_dtype)
        elif getattr(zo, "reduce_scatter", True):  # average_tensor: divide the bucket, then reduce (comm dtype)
            buf = buf.div_(self.world / sp).to(self.comm_dtype)
        else:  # gradient_reduction_w_predivide
            buf = buf.to(self.comm_dtype)
            if not postscale:
                buf.div_(self.world / sp)
            elif predivide != 1.0:
                buf.mul_(1.0 / predivide)
        D.all_reduce_sum(buf, self.group)
        if getattr(zo, "gradient_average", True) and not getattr(zo, "reduce_scatter", True) and postscale \
                and predivide != self.world:
            buf.mul_(predivide / (self.world / sp))
        return buf

    def end_step(self, dense: bool) -> None:
        """Called by the optimizer step: close this step's byte count."""
        kind = "dense" if dense else "packed"
        self.bytes_by_kind[kind] += self.step_bytes
        self.steps_by_kind[kind] += 1
        self.last_step_bytes = self.step_bytes
        self.step_bytes = 0
        synced = self.masks.sync_bytes()
        self.last_step_mask_bytes = synced - self._mask_bytes_seen
        self._mask_bytes_seen = synced
        self.mask_sync_bytes = synced
        self.masks.release()
        self.exchanged = False
        self._window_reductions = 0
        self.buffer = None

    # -- accounting ------------------------------------------------------------------------------------------------
    def mask_bytes(self) -> int:
        """The masks this rank keeps for the reduction beyond the sparsifier's own bits: 0 when sharded, the full
        masks of every sparsified parameter with ``sparsity.replicate_masks`` (1 bit per weight)."""
        return self.masks.held_bytes()

    def stats(self) -> dict:
        """Per rank: mean bytes handed to the gradient reduction per optimizer step, overall (gradient values and
        the masks' all-gathers) and by kind."""
        steps = sum(self.steps_by_kind.values())
        values = sum(self.bytes_by_kind.values())
        return {"grad_reduce_bytes_per_step": (values + self.mask_sync_bytes) / max(1, steps),
                **{f"{k}_steps": self.steps_by_kind[k] for k in ("packed", "dense")},
                **{f"{k}_bytes_per_step": self.bytes_by_kind[k] / max(1, self.steps_by_kind[k])
                   for k in ("packed", "dense")},
                "mask_sync_bytes_per_step": self.mask_sync_bytes / max(1, steps),
                "mask_sync_received_bytes_per_step": self.masks.received_bytes / max(1, steps),
                "replicate_masks": self.masks.replicate}
