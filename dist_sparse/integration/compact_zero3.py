"""Compact training state under DeepSpeed ZeRO stage 3 (``sparsity.compact_state: true``).

DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3`` (``deepspeed/runtime/zero/stage3.py``) gives each rank a shard
``param.ds_tensor`` of every parameter (the range ``[rank * n, (rank + 1) * n)`` of the flattened parameter, the
last rank's padded), laid out contiguously per optimizer *sub-group* in ``fp16_partitioned_groups_flat[i]`` (the
low-precision weights the forward pass all-gathers; ``grad_position`` gives each parameter's offset). Per
sub-group it keeps an fp32 master ``fp32_partitioned_groups_flat[i]`` (at fp32 this *is* the low-precision flat:
DeepSpeed does not copy), Adam moments of the same size, and a dense gradient shard per parameter
(``__param_id_to_grad_partition``, views of ``grad_partitions_flat_buffer``) that ``partition_grads`` fills after
each bucket's reduce-scatter. With compact state this rank keeps, per sub-group, one
:class:`~dist_sparse.compact.PackedPartition` (fragments = the parameters' shards, padding not stored):

- master weights: a packed fp32 tensor takes the slot ``fp32_partitioned_groups_flat[i]``, so DeepSpeed's own
  ``_optimizer_step`` and ``unscale_and_clip_grads`` step and clip it; the dense fp32 master (bf16 runs) is freed.
  At fp32 the low-precision shard holds exactly the active master values, so the packed master is, like
  DeepSpeed's aliasing, no second copy between steps: its storage is released after each step and re-packed from
  the shard before the next one (a transient of 4 bytes per active weight of one sub-group at a time);
- Adam moments: created on the packed tensor, so packed;
- gradients: only active gradients are reduced (:mod:`dist_sparse.integration.compact_reduce`: the active values
  of each rank's local gradients, packed by replicated full masks, one all-reduce per step; each rank keeps its
  shards' runs). On dense-gradient steps (RigL grows by |dense gradient|) DeepSpeed reduce-scatters and
  ``partition_grads`` (replaced on the instance) keeps each reduced shard dense (a transient; with gradient
  accumulation later micro-batches add to it, as DeepSpeed adds to its shards, in the same accumulation dtype).
  DeepSpeed's dense gradient buffer is freed, and so is its reduction bucket between backward passes (re-created
  on the next dense-step gradient, as DeepSpeed's ZeRO-1/2 does with its own);
- the step (``step`` replaced): DeepSpeed's ``get_grad_norm_direct`` per sub-group on the packed gradients, the
  invalid-norm/overflow bookkeeping, clipping, the inner optimizer step (wrapped: skipped on update steps that
  replace it), then packed master -> the low-precision shard with inactive positions exactly 0, and DeepSpeed's
  post-step (persistent parameters re-gathered).

Elementwise Adam on the active positions with the same clipped gradient is what masked-dense DeepSpeed computes;
only the norm's summation skips zeros (``tests/test_compact_state.py`` asserts the trajectory). This module does
not import deepspeed: it knows ``DeepSpeedZeroOptimizer_Stage3``'s attributes and keeps that knowledge here.
"""

import torch
import torch.distributed as dist

from dist_sparse.compact.packed import Fragment, PackedPartition
from dist_sparse.config import ConfigError
from dist_sparse.integration import patches
from dist_sparse.integration.compact_reduce import PackedReduction
from dist_sparse.integration.compact_zero import KEY, PackedZeroState, check_common, combine_grad_norm_groups
from dist_sparse.integration.patches import STAGE3_GRAD_PARTITIONS, STAGE3_REDUCE_IPG


class CompactZero3State(PackedZeroState):
    """ZeRO-3: DeepSpeed's ``DeepSpeedZeroOptimizer_Stage3``; installed by
    :func:`dist_sparse.integration.compact_zero.enable`. ``reduce_gradients``: whether this store takes over the
    gradient reduction (the packed all-reduce); False when gradient compression owns it
    (``ds_compression.CompressedReduction`` hands each rank's averaged shard ranges to :meth:`accept_grad`).
    ``replicate_masks``: the packed reduction keeps the full masks between mask changes
    (``sparsity.replicate_masks``)."""

    def __init__(self, engine, sparsifier, param_views: list, reduce_gradients: bool = True,
                 replicate_masks: bool = False):
        check_common(engine, "DeepSpeedZeroOptimizer_Stage3")
        zo = engine.optimizer
        if getattr(zo, "offload_param", False) or getattr(zo, "swap_optimizer", False):
            raise ConfigError(KEY, "is not supported with zero_optimization.offload_param")
        if getattr(zo, "use_muon", False):
            raise ConfigError(KEY, "supports Adam/AdamW, not Muon")
        super().__init__(engine, sparsifier)
        self._replicate_masks = replicate_masks
        names = {id(p): n for n, p in engine.module.named_parameters()}
        for i, group in enumerate(zo.fp16_groups):
            frags = []
            for p in group:
                _, offset, per_rank = zo.grad_position[zo.get_param_id(p)]
                rank = dist.get_rank(group=p.ds_process_group)
                start = min(p.ds_numel, rank * per_rank)  # as Stage3View: the shard, padding excluded
                length = max(0, min(per_rank, p.ds_numel - start))
                name = names[id(p)]
                frags.append(Fragment(name, offset, length, start, name in sparsifier.order))
                self.where[id(p)] = (i, name)
            self.parts.append(PackedPartition(frags, self.layout_mask))
            self.lp_parts.append(zo.fp16_partitioned_groups_flat[i])
        self.grads = [None] * len(self.parts)
        # fp32 runs: the lp shard holds the master values (DeepSpeed means to alias the two, but its device test
        # compares a torch.device with a string and 0.19.8 keeps a copy); no packed copy between steps
        self.master_in_lp = all(lp.dtype == torch.float32 for lp in self.lp_parts)
        self.transient_master_bytes = 0
        self._materialised = [True] * len(self.parts)  # master_in_lp: whether the packed master has storage now
        self.grad_dtype = zo.gradient_accumulation_dtype  # what DeepSpeed stores the reduced shards in
        self.masters = list(zo.fp32_partitioned_groups_flat)
        self.shards = None  # PackedShards once enable_packed_shards ran (packed_gather under compact state)
        self._install_master()
        self._free_dense_gradients()
        self._patch(reduce_gradients)
        self._make_views(param_views)

    # -- master weights ----------------------------------------------------------------------------------------
    def _install_slot(self, i: int, packed: torch.Tensor) -> None:
        self.zo.fp32_partitioned_groups_flat[i] = packed

    def enable_packed_shards(self, packed_gather: bool) -> None:
        """Store the sparsified parameters' low-precision shards packed (:mod:`.packed_shards`): with
        ``sparsity.packed_gather`` the gather reads the packed values, so the dense shard is not kept."""
        from dist_sparse.integration.packed_shards import PackedShards

        if self.sparsifier.frozen:  # also refused by the config check; this guards attach() called directly
            raise ConfigError("freeze.fraction", "is not supported with sparsity.packed_gather under compact state: "
                                                 "packed shards keep only the packed (trainable) values, and frozen "
                                                 "weights live in the dense shard")
        self.shards = PackedShards(self, packed_gather)

    def _write_lp(self, i: int, packed: torch.Tensor, masks: list) -> None:
        """The packed master of group ``i`` (laid out by ``masks``, the current masks) -> the low-precision
        weights: packed values with packed shards, else the dense shard with inactive positions exactly 0."""
        if self.shards is not None:
            self.shards.write(i, packed)
        else:
            super()._write_lp(i, packed, masks)

    def _pack_lp(self, i: int, masks: list | None = None) -> torch.Tensor:
        """The active values of the lp flat of group ``i`` (laid out by ``masks``, default: the current ones)."""
        if self.shards is not None:
            return self.shards.pack_lp(i, self.parts[i].masks() if masks is None else masks)
        part, lp = self.parts[i], self.lp_parts[i]
        return part.pack(lambda k: lp.narrow(0, part.fragments[k].start, part.fragments[k].length),
                         part.masks() if masks is None else masks, torch.float32, lp.device)

    def lp_fragment(self, i: int, name: str) -> torch.Tensor:
        """The dense low-precision shard of ``name`` (padding excluded); not for a packed shard."""
        if self.shards is not None:
            if self.shards.is_packed(self.shards.param[name]):
                raise RuntimeError(f"{name}: the shard is stored packed, it has no dense low-precision fragment")
            return self.shards.fragment(i, name)
        part = self.parts[i]
        f = part.fragments[part.index[name]]
        return self.lp_parts[i].narrow(0, f.start, f.length)

    def _install_master(self) -> None:
        """Pack DeepSpeed's fp32 masters (already masked) into the slots. With the master in the lp shard, Adam's
        state is created now (zero moments, step 0: what torch's Adam creates in its first step), so that it has
        the packed size although the master's storage is released between steps."""
        for i, part in enumerate(self.parts):
            dense = self.zo.fp32_partitioned_groups_flat[i]
            packed = part.pack(lambda k, d=dense, f=part.fragments: d.narrow(0, f[k].start, f[k].length),
                               part.masks(), torch.float32, dense.device)
            state = {}
            if self.master_in_lp:
                state = {"step": torch.tensor(0.0, dtype=torch.float32),
                         "exp_avg": torch.zeros_like(packed), "exp_avg_sq": torch.zeros_like(packed)}
            self._set_group_tensor(i, packed, state)
            self._release_master(i)

    def _release_master(self, i: int) -> None:
        """fp32: the active master values are in the lp shard; drop the packed copy's storage (the tensor object
        stays: it keys Adam's state and fills DeepSpeed's slot)."""
        if self.master_in_lp:
            m = self.masters[i]
            m.data = torch.zeros(0, dtype=m.dtype, device=m.device)
            self._materialised[i] = False

    def _materialise_master(self, i: int, masks: list | None = None) -> torch.Tensor:
        m = self.masters[i]
        if self.master_in_lp and not self._materialised[i]:
            m.data = self._pack_lp(i, masks)
            self._materialised[i] = True
            self.transient_master_bytes = max(self.transient_master_bytes, m.untyped_storage().nbytes())
        return m

    def packed(self, i: int, name: str, key=None):
        if key is None and self.master_in_lp and not self._materialised[i]:  # a read: from the lp shard
            part = self.parts[i]
            frag = part.fragments[part.index[name]]
            if self.shards is not None and self.shards.is_packed(self.shards.param[name]):
                return self.shards.values_of(self.shards.param[name])  # fp32: the packed values are the master
            mask = part.mask_of(name).reshape(-1) if frag.sparse else None
            return part.pack_fragment(self.lp_fragment(i, name), mask).to(torch.float32)
        return super().packed(i, name, key)

    def master_slice(self, i: int, name: str) -> torch.Tensor:
        """A view of the packed master the optimizer will step: at fp32 (the master lives in the lp shard between
        steps) it is materialised now, before the step that would materialise it anyway, and released after it."""
        self._materialise_master(i)
        return super().master_slice(i, name)

    def mask_lp_fragment(self, i: int, name: str, mask: torch.Tensor) -> None:
        """fp32 (the master is the lp shard): zero the master of ``name`` where ``mask`` is False. A packed
        shard stores only the positions of the current layout, and compact state masks by that layout only."""
        if self.shards is not None and self.shards.is_packed(self.shards.param[name]):
            part = self.parts[i]
            keep = mask.reshape(-1).to(torch.bool)[part.mask_of(name).reshape(-1).to(mask.device)]
            values = self.shards.values_of(self.shards.param[name])
            values.masked_fill_(~keep.to(values.device), 0)
            return
        frag = self.lp_fragment(i, name)
        frag.masked_fill_(~mask.reshape(-1).to(frag.device), 0)

    @torch.no_grad()
    def repack(self, old_masks: dict) -> None:
        if self.master_in_lp:  # the lp shard is still laid out by the old masks: materialise by those
            for i, part in enumerate(self.parts):
                self._materialise_master(i, [old_masks[f.name] if f.sparse else None for f in part.fragments])
        super().repack(old_masks)
        for i in range(len(self.parts)):
            self._release_master(i)

    @torch.no_grad()
    def finish_load(self) -> None:
        """Install the loaded masters and moments; the lp shards (ZeRO-3 has no replicated model to load) get the
        masters, inactive positions 0, and persistent parameters are re-gathered from them."""
        super().finish_load()
        if self.reduction is not None:  # None: gradient compression reduces
            self.reduction.masks_changed()  # the loaded masks: the reduction's layout is rebuilt
        for i, part in enumerate(self.parts):
            self._write_lp(i, self.masters[i].detach(), part.masks())
            self.zo._unflatten_partitioned_parameters(i)
            self._release_master(i)
        self._gather_persistent()

    def _gather_persistent(self) -> None:
        persistent = getattr(self.zo, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)

    def bytes_held(self) -> dict:
        held = super().bytes_held()
        if self.shards is not None:  # the packed low-precision values (DeepSpeed's dense buffer: its attributes)
            held["weights"] = self.shards.bytes_held()
        return held

    # -- gradients ---------------------------------------------------------------------------------------------
    def _free_dense_gradients(self) -> None:
        """DeepSpeed's dense gradient shards (one flat buffer) are not used: ``partition_grads`` stores packed."""
        zo = self.zo
        buf = zo.grad_partitions_flat_buffer
        zo.grad_partitions_flat_buffer = torch.zeros(0, dtype=buf.dtype, device=buf.device)
        patches.assign(zo, STAGE3_GRAD_PARTITIONS, {}, by="compact state: gradient shards are kept packed")
        zo.averaged_gradients = {}
        self._bucket_specs = {}
        for dtype, bucket in zo.ipg_buckets.items():
            if torch.is_tensor(getattr(bucket, "buffer", None)):
                self._bucket_specs[dtype] = (bucket.buffer.numel(), bucket.buffer.device)

    def _release_buckets(self) -> None:
        for dtype, bucket in self.zo.ipg_buckets.items():
            if dtype in self._bucket_specs:
                bucket.buffer = torch.zeros(0, dtype=dtype, device=self._bucket_specs[dtype][1])

    def _restore_buckets(self) -> None:
        for dtype, bucket in self.zo.ipg_buckets.items():
            spec = self._bucket_specs.get(dtype)
            if spec is not None and bucket.buffer.numel() != spec[0]:
                bucket.buffer = torch.empty(spec[0], dtype=dtype, device=spec[1])

    def _patch(self, reduce_gradients: bool) -> None:
        zo, store = self.zo, self
        reduce_param = zo.reduce_independent_p_g_buckets_and_remove_grads

        def reduce_param_grad(param):
            store._restore_buckets()  # released after the previous backward
            return reduce_param(param)

        # only active gradients are reduced outside dense-gradient steps (DeepSpeed's reduce-scatter on those);
        # with gradient compression nothing enters DeepSpeed's buckets (the exchange keeps the local gradients and
        # reduces them at the boundary into accept_grad), so the buckets stay released
        self.reduction = reduction = None
        if reduce_gradients:
            self.reduction = reduction = PackedReduction(self, reduce_param_grad, self._replicate_masks)

        def partition_grads(params_to_release, grad_partitions):
            # DeepSpeed's partition_grads into packed storage: copy on the window's first micro-batch
            # (micro_step_id 0), add on later ones (gradient accumulation)
            for param, grad_partition in zip(params_to_release, grad_partitions):
                if param.partition_numel() * zo._get_param_partition_rank(param) < param.ds_numel:
                    store.capture_grad(param, grad_partition, start=0, accumulate=zo.micro_step_id != 0)
                param.grad = None
            return []

        def independent_gradient_partition_epilogue():
            # DeepSpeed's epilogue without dense ``averaged_gradients`` (the packed gradients are ours)
            store.dense_grad_step = store._dense_grad_step()
            if reduction is None:
                pass  # gradient compression reduces at the step boundary
            elif store.dense_grad_step:
                for dtype in sorted(zo.ipg_buckets.keys(), key=str):  # DeepSpeed's sort_dtypes order
                    getattr(zo, STAGE3_REDUCE_IPG)(dtype)
            else:  # the packed all-reduce of active gradients (compact_reduce.py)
                reduction.end_backward(store.engine.is_gradient_accumulation_boundary())
            stream = getattr(zo, "reduce_and_partition_stream", None)
            if stream is not None:
                stream.synchronize()
            for param_id in zo.params_already_reduced.keys():
                zo.params_already_reduced[param_id] = False
            store._release_buckets()
            zo._epilogue_ran_this_backward = True

        self._install_hooks(partition_grads=partition_grads,
                            independent_gradient_partition_epilogue=independent_gradient_partition_epilogue,
                            step=self.step, **(reduction.install() if reduction is not None else {}))

    # -- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """DeepSpeed's ZeRO-3 step (``DeepSpeedZeroOptimizer_Stage3.step``) on packed tensors."""
        zo = self.zo
        if self.reduction is not None:  # None: gradient compression reduces
            self.reduction.end_step(self._dense_grad_step())
        zo._pre_step()
        zo._partition_all_parameters()
        zo.overflow = False
        grads = self.take_grads_fp32()
        norm_groups = []
        for i, part in enumerate(self.parts):  # DeepSpeed's norm, one piece per parameter (as averaged_gradients)
            pieces = [part.slice(grads[i], f.name) for f in part.fragments]
            norm_groups.append(zo.get_grad_norm_direct(pieces, zo.fp16_groups[i]))
        scaled_norm = self._with_dense_nonfinite(combine_grad_norm_groups(norm_groups))
        if not bool(torch.isfinite(scaled_norm)):
            zo.overflow = True
        if zo._loss_scale_update_and_overflow_cleanup():
            self.dense_grad_step = False
            return
        zo._global_grad_norm = scaled_norm / zo.loss_scale
        zo.zero_grad(set_to_none=True)
        for i, part in enumerate(self.parts):
            m = self._materialise_master(i)
            m.grad = grads[i]
            zo.unscale_and_clip_grads(i, scaled_norm)  # DeepSpeed's clipping of fp32_partitioned_groups_flat[i]
            zo._optimizer_step(i)  # the inner optimizer (wrapped by SparseEngine) on the packed master
            m.grad = None
            grads[i] = None
            self._write_lp(i, m.detach(), part.masks())
            zo._unflatten_partitioned_parameters(i)
            self._release_master(i)
        zo._post_step(set())  # persistent parameters re-gathered from the shards, secondary tensors invalidated
        self.dense_grad_step = False
