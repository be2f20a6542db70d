"""Packed parameter shards at ZeRO-3: a sparsified parameter's shard stored as its active values + the mask bits.

With ``sparsity.compact_state: true`` and ``sparsity.packed_gather: true`` at ZeRO-3, compact state keeps the
masters, moments and gradients packed and the packed gather sends only the active values of each shard, so the
dense low-precision shard ``param.ds_tensor`` (``ceil(numel / N)`` elements per parameter, padding included) is no
longer needed between steps: the values of its active positions are enough, and the rank already holds its
shard's mask bits (the sparsifier's). :class:`PackedShards` (owned by
:class:`~dist_sparse.integration.compact_zero3.CompactZero3State`) stores them that way.

What DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage3.py``, ``partition_parameters.py``) keeps, and what changes:

- ``lp_param_buffer``: one flat buffer of every parameter's shard, ``fp16_partitioned_groups_flat[i]`` the
  sub-group ``i`` part of it (``narrow``), each ``param.ds_tensor.data`` a view of that. Replaced by a buffer
  holding only the shards that stay dense, at the same per-sub-group grouping; the packed parameters'
  ``ds_tensor`` objects stay (DeepSpeed reads ``ds_tensor.ds_numel`` for the shard size everywhere) with an empty
  ``.data``.
- what stays dense: parameters that are not sparsified, sparsified ones DeepSpeed keeps whole
  (``ds_persist``: at most ``stage3_param_persistence_threshold`` elements; every rank holds the full tensor in
  ``param.data`` anyway, so a packed shard would save 1/N of an already replicated tensor), and parameters whose
  partition group is one rank (nothing is gathered, DeepSpeed reads the shard as the parameter).
- the packed values: per sub-group one tensor of the low-precision dtype, the packed parameters' active values
  in fragment order, each fragment's active positions in increasing order (the sparsifier's bits are the index).
  After every optimizer step and mask change they are the packed fp32 master cast to the low-precision dtype,
  which is exactly what the dense shard held at those positions (compact state writes ``cast(master)`` there and
  exact zeros elsewhere): regrown positions start at 0, dropped ones disappear, as for masters and moments.

Every DeepSpeed path that reads or writes ``ds_tensor`` of a packed parameter is handled here, in one place:

- the partitioned-parameter coordinator's gathers (forward and backward, prefetching): ``ParamGather``
  (:mod:`~dist_sparse.integration.packed_gather`) reads :meth:`PackedShards.values_of`, no dense shard;
- DeepSpeed's dense ``param.all_gather`` (``deepspeed.zero.GatheredParameters``, the consolidated 16-bit state
  dict of ``save_final_model`` and of DeepSpeed's own checkpoints, ``param.item()``): replaced on every ZeRO-3
  parameter (a closure over DeepSpeed's ``Init``, any parameter's serves any list); for the packed members of
  the list a dense shard is materialised (zeros + the values at the mask's positions, the shard DeepSpeed would
  have held), DeepSpeed's gather runs unchanged, and the transients are dropped right after. Their largest total
  is ``transient_bytes_per_rank.dense_shards_for_dense_gathers``. DeepSpeed's persistent-parameter refresh after
  a step (``_post_step``) gathers persistent parameters only, which stay dense;
- ``param.partition(has_been_updated=True)`` (``GatheredParameters(..., modifier_rank=r)``: DeepSpeed copies the
  gathered, possibly modified, weights back into the shard): the copy goes into a materialised dense shard, which
  is then compared with the packed one. Unchanged (DeepSpeed's consolidated 16-bit state dict gathers with
  ``modifier_rank=0`` only to free memory layer by layer): accepted. Changed: the change is discarded and
  :class:`PackedShardError` raised, since weights written behind the optimizer's back would not reach the fp32
  master or the masks (DeepSpeed's own fp32 partition does not follow either); load weights through a checkpoint;
- ``_unflatten_partitioned_parameters`` (DeepSpeed re-points every shard at its flat group after writing it):
  replaced on the optimizer instance by the re-pointing of the dense shards only;
- checkpoints: dist_sparse's format saves masters, moments and masks per range (never ``ds_tensor``); a load
  installs the masters and writes the packed values from them. DeepSpeed's own ``save_checkpoint`` and its
  ``zero_to_fp32`` script are unsupported with compact state already (its fp32 flat groups are packed; its
  pickled files are not used, see :mod:`dist_sparse.checkpoint`) and stay so.

This module does not import deepspeed.
"""

import contextlib

import torch

from dist_sparse import distributed as D
from dist_sparse.compact.packed import PackedPartition
from dist_sparse.errors import ConfigError, DistSparseError
from dist_sparse.integration import patches

KEY = "sparsity.packed_gather"


class PackedShardError(DistSparseError, RuntimeError):
    """A DeepSpeed operation would write a packed parameter shard densely (names the parameters)."""


def _status(param, name: str):
    return getattr(type(param.ds_status), name)


class PackedShards:
    """The packed low-precision shards of one engine's ZeRO-3 optimizer (see the module docstring). ``store``:
    the engine's :class:`~dist_sparse.integration.compact_zero3.CompactZero3State` (its ``parts`` give the layout,
    the sparsifier the masks); ``packed_gather``: whether ``sparsity.packed_gather`` is on (required)."""

    def __init__(self, store, packed_gather: bool):
        if type(store).__name__ != "CompactZero3State":
            raise ConfigError("sparsity.compact_state", "packed parameter shards need compact state at ZeRO-3 "
                                                        "(sparsity.compact_state: true, zero_optimization.stage: 3)")
        if not packed_gather:
            raise ConfigError(KEY, "packed parameter shards are read by the packed gather (the dense shard they "
                                   "replace is what DeepSpeed's gather sends): set sparsity.packed_gather: true")
        self.store = store
        zo = self.zo = store.zo
        names = {id(p): n for n, p in store.engine.module.named_parameters()}
        self.param = {}  # name -> parameter (every parameter of a sub-group)
        self.where = {}  # id(param) of a packed parameter -> (sub-group, name)
        self.dense_names = []  # per sub-group: names of the parameters whose shard stays dense
        for i, group in enumerate(zo.fp16_groups):
            part = store.parts[i]
            dense = []
            for p in group:
                name = names[id(p)]
                self.param[name] = p
                frag = part.fragments[part.index[name]]
                if frag.sparse and not p.ds_persist and D.world_size(p.ds_process_group) > 1:
                    self.where[id(p)] = (i, name)
                else:
                    dense.append(name)
            self.dense_names.append(dense)
        self.lp_dtype = store.lp_parts[0].dtype if store.lp_parts else torch.float32
        self._slice_cache: dict = {}
        # from the current dense shards (masked: pruned positions are 0), before they are released
        self.values = [self._gather_packed(i, self._dense_values(i)) for i in range(len(store.parts))]
        self._rebuild_dense_buffer()
        self.transient_dense_bytes = 0  # the largest total of dense shards materialised at once
        self.dense_gathers = 0  # DeepSpeed dense gathers that needed materialised shards
        self._install()

    # -- layout ----------------------------------------------------------------------------------------------------
    def packed_names(self, i: int) -> list:
        part = self.store.parts[i]
        return [f.name for f in part.fragments if id(self.param[f.name]) in self.where]

    def _gather_packed(self, i: int, values_of) -> torch.Tensor:
        """The packed parameters' values of sub-group ``i`` (``values_of(name)``: one fragment's active values)
        concatenated in fragment order, in the low-precision dtype."""
        pieces = [values_of(name).reshape(-1) for name in self.packed_names(i)]
        device = self.store.lp_parts[i].device
        if not pieces:
            return torch.zeros(0, dtype=self.lp_dtype, device=device)
        return torch.cat(pieces).to(device=device, dtype=self.lp_dtype)

    def _dense_values(self, i: int):
        """name -> the active values of its fragment in DeepSpeed's dense flat group ``i`` (before the rebuild)."""
        part, lp = self.store.parts[i], self.store.lp_parts[i]

        def values_of(name):
            f = part.fragments[part.index[name]]
            return part.pack_fragment(lp.narrow(0, f.start, f.length), part.mask_of(name).reshape(-1))
        return values_of

    def _slices(self, i: int) -> dict:
        """name -> (offset, count) of each packed parameter's values in ``values[i]`` (the current layout).
        Cached per layout: ``PackedPartition.relayout`` assigns a new offsets list, and the cache holds the list
        it was computed from (so its identity cannot be reused)."""
        part = self.store.parts[i]
        cached = self._slice_cache.get(i)
        if cached is not None and cached[0] is part.offsets:
            return cached[1]
        out, at = {}, 0
        for name in self.packed_names(i):
            k = part.index[name]
            n = part.offsets[k + 1] - part.offsets[k]
            out[name] = (at, n)
            at += n
        self._slice_cache[i] = (part.offsets, out)
        return out

    def values_of(self, param) -> torch.Tensor:
        """This rank's active values of a packed parameter's shard (a view; the packed gather's payload)."""
        i, name = self.where[id(param)]
        at, n = self._slices(i)[name]
        return self.values[i].narrow(0, at, n)

    def is_packed(self, param) -> bool:
        return id(param) in self.where

    def _rebuild_dense_buffer(self) -> None:
        """DeepSpeed's ``lp_param_buffer`` with only the dense shards (same sub-group order, each shard padded as
        DeepSpeed pads it); the packed parameters' ``ds_tensor`` keep their objects and ``ds_numel``, not data."""
        zo = self.zo
        device = self.store.lp_parts[0].device if self.store.lp_parts else torch.device("cpu")
        sizes = [sum(self.param[n].ds_tensor.ds_numel for n in names) for names in self.dense_names]
        buffer = torch.empty(sum(sizes), dtype=self.lp_dtype, device=device)
        at = 0
        self.dense_flat = []
        for i, names in enumerate(self.dense_names):
            flat = buffer.narrow(0, at, sizes[i])
            offset = 0
            for n in names:
                t = self.param[n].ds_tensor
                view = flat.narrow(0, offset, t.ds_numel)
                view.copy_(t.data.reshape(-1))
                t.data = view
                offset += t.ds_numel
            zo.fp16_partitioned_groups_flat[i] = flat
            self.dense_flat.append(flat)
            at += sizes[i]
        for p in self.param.values():
            if id(p) in self.where:
                p.ds_tensor.data = torch.zeros(0, dtype=self.lp_dtype, device=device)
        zo.lp_param_buffer = buffer
        # compact state's lp partitions were DeepSpeed's flat groups, addressed by the old fragment offsets: an
        # empty tensor of the same dtype and device now, so that any leftover dense addressing fails loudly
        self.store.lp_parts = [torch.zeros(0, dtype=self.lp_dtype, device=device) for _ in self.store.parts]

    # -- writes --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write(self, i: int, master: torch.Tensor) -> None:
        """Packed fp32 master of sub-group ``i`` (current layout) -> the packed low-precision values and the dense
        shards that stay (inactive positions of those exactly 0, as compact state writes a dense shard)."""
        part = self.store.parts[i]
        self.values[i] = self._gather_packed(i, lambda name: part.slice(master, name))
        for name in self.dense_names[i]:
            k = part.index[name]
            f = part.fragments[k]
            mask = part.mask_of(name).reshape(-1) if f.sparse else None
            shard = self.param[name].ds_tensor.data.view(-1).narrow(0, 0, f.length)
            shard.copy_(PackedPartition.unpack_fragment(part.slice(master, name), mask, shard.dtype))

    def pack_lp(self, i: int, masks: list) -> torch.Tensor:
        """Sub-group ``i``'s values in the packed master layout (fp32; ``masks``: the layout the values are in,
        the current one or, inside a repack, the old one), from the packed values and the dense shards."""
        part = self.store.parts[i]
        slices = self._slices(i)
        offsets = part._offsets(masks)
        out = torch.empty(offsets[-1], dtype=torch.float32, device=self.values[i].device)
        for k, f in enumerate(part.fragments):
            dst = out.narrow(0, offsets[k], offsets[k + 1] - offsets[k])
            if f.name in slices:
                dst.copy_(self.values[i].narrow(0, *slices[f.name]))
            else:
                shard = self.param[f.name].ds_tensor.data.view(-1).narrow(0, 0, f.length)
                dst.copy_(part.pack_fragment(shard, masks[k]))
        return out

    def fragment(self, i: int, name: str) -> torch.Tensor:
        """The stored values of parameter ``name`` in sub-group ``i``: the packed values (a view) of a packed
        parameter, the dense shard (padding excluded) otherwise."""
        p = self.param[name]
        if id(p) in self.where:
            return self.values_of(p)
        part = self.store.parts[i]
        return p.ds_tensor.data.view(-1).narrow(0, 0, part.fragments[part.index[name]].length)

    # -- DeepSpeed's paths that read or write ds_tensor --------------------------------------------------------
    def dense_shard(self, param) -> torch.Tensor:
        """The dense shard DeepSpeed would hold for a packed parameter (a new tensor, padded to ``ds_numel``):
        exact zeros except the active values at the mask's positions."""
        i, name = self.where[id(param)]
        part = self.store.parts[i]
        f = part.fragments[part.index[name]]
        out = torch.zeros(param.ds_tensor.ds_numel, dtype=self.lp_dtype, device=self.values[i].device)
        out.narrow(0, 0, f.length).masked_scatter_(part.mask_of(name).reshape(-1).to(out.device),
                                                   self.values_of(param))
        return out

    @contextlib.contextmanager
    def materialised(self, params: list):
        """Dense shards for the packed members of ``params`` while the block runs (a transient, counted)."""
        packed = [p for p in params if id(p) in self.where]
        shards = [self.dense_shard(p) for p in packed]
        self.transient_dense_bytes = max(self.transient_dense_bytes,
                                         sum(s.untyped_storage().nbytes() for s in shards))
        empty = torch.zeros(0, dtype=self.lp_dtype, device=shards[0].device) if shards else None
        try:
            for p, s in zip(packed, shards):
                p.ds_tensor.data = s
            yield
        finally:
            for p in packed:
                p.ds_tensor.data = empty

    def _install(self) -> None:
        for p in self.store.engine.module.parameters():
            if hasattr(p, "ds_tensor") and hasattr(p, "all_gather"):
                patches.replace(p, "all_gather", self._all_gather(p, p.all_gather),
                                by="packed shards: DeepSpeed's dense gather of a packed shard reads a transient "
                                   "dense shard")
                patches.replace(p, "partition", self._partition(p, p.partition),
                                by="packed shards: refuse dense writes into a packed shard")
        patches.replace(self.zo, "_unflatten_partitioned_parameters", self._unflatten,
                        by="packed shards: only dense shards live in DeepSpeed's flat groups")

    def _all_gather(self, owner, original):
        shards = self

        def all_gather(param_list=None, async_op=False, hierarchy=0):
            params = [owner] if param_list is None else list(param_list)
            need = [p for p in params if id(p) in shards.where and p.ds_status == _status(p, "NOT_AVAILABLE")]
            if not need:
                return original(param_list=params, async_op=async_op, hierarchy=hierarchy)
            # DeepSpeed's gather reads the shards when it is issued; an asynchronous one may still read them after
            # it returns, so with packed members it runs synchronously (the transients must outlive the reads) and
            # hands back no handles: every parameter is AVAILABLE on return, as after DeepSpeed's own sync gather
            shards.dense_gathers += 1
            with shards.materialised(need):
                original(param_list=params, async_op=False, hierarchy=hierarchy)
            return [] if async_op else None
        return all_gather

    def _partition(self, owner, original):
        shards = self

        def partition(param_list=None, hierarchy=0, has_been_updated=False, free_data=True):
            params = [owner] if param_list is None else list(param_list)
            packed = [p for p in params if id(p) in shards.where] if has_been_updated else []
            if not packed:
                return original(param_list=params, hierarchy=hierarchy, has_been_updated=has_been_updated,
                                free_data=free_data)
            # DeepSpeed copies each gathered parameter's range back into its shard. Its own consolidated 16-bit
            # state dict (save_final_model, checkpoints) gathers with modifier_rank=0 only to release memory and
            # writes back what it gathered; that is accepted. A write that changes a packed shard is refused:
            # weights written behind the optimizer would not reach the fp32 master or the masks either
            with shards.materialised(packed):
                out = original(param_list=params, hierarchy=hierarchy, has_been_updated=True, free_data=free_data)
                changed = [shards.store_name(p) for p in packed if not torch.equal(p.ds_tensor.data,
                                                                                   shards.dense_shard(p))]
            if changed:
                raise PackedShardError(
                    f"weights of packed shards were modified through DeepSpeed ({', '.join(changed[:3])}"
                    f"{', ...' if len(changed) > 3 else ''}: GatheredParameters(modifier_rank=...) or a module apply "
                    "under zero.Init). With sparsity.compact_state + sparsity.packed_gather at ZeRO-3 a sparsified "
                    "shard is its active values + mask bits, and weights written behind the optimizer would not "
                    "reach the fp32 master or the masks; the change was discarded. Load weights through a "
                    "checkpoint (dist-sparse train --resume)")
            return out
        return partition

    def store_name(self, param) -> str:
        return self.where[id(param)][1]

    def _unflatten(self, sub_group_id):
        """DeepSpeed's ``_unflatten_partitioned_parameters``: the dense shards are re-pointed at their places in
        the sub-group's flat buffer (the packed ones have none)."""
        flat = self.zo.fp16_partitioned_groups_flat[sub_group_id]
        offset = 0
        for name in self.dense_names[sub_group_id]:
            t = self.param[name].ds_tensor
            t.data = flat.narrow(0, offset, t.ds_numel)
            offset += t.ds_numel

    # -- accounting --------------------------------------------------------------------------------------------
    def bytes_held(self) -> list:
        """The packed values (``weights``; DeepSpeed's dense buffer is counted from its own attributes)."""
        return list(self.values)

    def stats(self) -> dict:
        held = sum(v.untyped_storage().nbytes() for v in self.values)
        dense = sum(self.param[name].ds_tensor.ds_numel for _, name in self.where.values()) * \
            torch.empty(0, dtype=self.lp_dtype).element_size()
        return {"packed_params": len(self.where), "packed_value_bytes": held,
                "dense_shard_bytes_replaced": dense, "dense_gathers_materialised": self.dense_gathers}
