"""ZeRO-3 parameter gathers: mask-aware (``sparsity.packed_gather``) and counted (``param_gather_bytes_per_step``).

At ZeRO-3 each rank keeps a shard ``param.ds_tensor`` of every parameter (``[r n, (r + 1) n)`` of the flattened
tensor, ``n = ceil(numel / world)``, the last shard padded), and DeepSpeed all-gathers the whole parameter before
every module's forward and backward that needs it. Of a sparsified weight most of those values are known zeros:
the shard holds exact zeros at pruned positions (the sparsifier writes them after every step and mask change). With
``sparsity.packed_gather: true`` a rank hands the collectives only the bit-packed mask of its shard (1 bit per
weight, the sparsifier's own bits: at ZeRO-3 a rank holds its shard's mask) and the values at the active positions,
and every rank rebuilds the full weight with zeros elsewhere, which is the dense gather's result bit for bit.

Where DeepSpeed 0.19.8 gathers, and what this module relies on (``deepspeed/runtime/zero/``):

- ``PartitionedParameterCoordinator.__all_gather_params_`` (``partitioned_param_coordinator.py``) fetches a
  module's parameters, and prefetches those of the next modules of its recorded trace, by calling
  ``param_group[0].all_gather_coalesced(param_group, quantize=...)``, an attribute ``Init._convert_to_deepspeed_param``
  (``partition_parameters.py``) sets on *every* ZeRO-3 parameter (a closure over the ``Init`` context, so any
  parameter's serves any list). It is the only caller. It registers the returned handle for every parameter of the
  list and later calls ``handle.wait(handle_dependency=...)`` once per parameter before the module runs; after
  ``wait`` a parameter must hold its full tensor in ``param.data`` and have ``ds_status == AVAILABLE``. Releasing
  (``param.partition()``) is untouched, so DeepSpeed's prefetching, reuse distance and release work as before.
- the parameter attributes ``ds_tensor`` (the shard, ``ds_tensor.ds_numel`` elements), ``ds_numel``,
  ``ds_shape``, ``ds_status`` (``ZeroParamStatus``: ``NOT_AVAILABLE`` -> ``INFLIGHT`` when the gather starts ->
  ``AVAILABLE``), ``ds_id`` (every rank gathers a list in ``ds_id`` order), ``ds_process_group``,
  ``ds_secondary_tensor`` (hpZ) and ``ds_persist``.

So ``all_gather_coalesced`` is replaced (:func:`dist_sparse.integration.patches.replace`, recorded) on every ZeRO-3
parameter of the model, in one place: :class:`ParamGather`. Its replacement splits each list: the sparsified
parameters go through the packed gather, every other parameter (not sparsified, or gathered with DeepSpeed's
quantization) through DeepSpeed's original, unchanged, in the same call. Parameters DeepSpeed keeps whole
(``stage3_param_persistence_threshold``) are never gathered by the coordinator; their refresh after each step
(``_post_step``) and every other gather (``GatheredParameters``, the consolidated 16-bit state dict of the final
export and checkpoints) use DeepSpeed's dense ``param.all_gather`` and are not counted here. With compact state
the sparsified shards are themselves packed (:mod:`dist_sparse.integration.packed_shards`): the active values
are then read from the packed store (``shards``), and the dense paths get transient dense shards there.

The packed gather of a list (per dtype, the parameters in ``ds_id`` order, the same on every rank):

1. all-gather the mask bits: per parameter ``ceil(n / 8)`` bytes of the rank's shard (padding bits 0), so every
   rank hands the same length. These bits are also the count exchange: each rank's number of active values per
   parameter is their popcount.
2. all-gather the active values of the shards, concatenated, each rank's payload padded with zeros to the largest
   rank's count (an all-gather needs equal sizes; padding to the max is one collective where per-rank counts
   would need a variable-length exchange the backends do not share). Issued asynchronously, like DeepSpeed's; the
   coordinator's ``wait`` completes it and rebuilds the full weights (``masked_scatter`` of every rank's values
   into zeros at its shard's active positions).

Bytes a rank hands to the collectives per packed gather: ``sum(ceil(n / 8)) + element_size x max_r(active_r)``;
DeepSpeed's dense gather hands ``element_size x sum(n)``. Both are counted for every gather issued while the model
is in training mode (evaluation forwards are not training traffic), and divided by the optimizer steps: the
``summary.json`` keys ``param_gather_bytes_per_step`` (what this rank handed) and
``dense_param_gather_bytes_per_step`` (what DeepSpeed's dense gather of the same lists hands; equal when
``packed_gather`` is off). Step 1 blocks: the value payload's length depends on every rank's count, so a packed
gather costs one extra round trip (on a GPU also a host synchronisation) before its values can be sent.

This module does not import deepspeed.
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.errors import ConfigError
from dist_sparse.integration import patches
from dist_sparse.masks.packing import packed_nbytes, unpack_bits
from dist_sparse.step import Component

KEY = "sparsity.packed_gather"
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _status(param, name: str):
    """A ``ZeroParamStatus`` member, read from the parameter's own status (no deepspeed import here)."""
    return getattr(type(param.ds_status), name)


def _itemsize(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def engine_refusal(engine) -> str | None:
    """Why this ZeRO-3 engine cannot gather packed (None: it can). The config check
    (:func:`dist_sparse.config.check_packed_gather`) refuses the same settings before any process group starts;
    this covers engines attached directly (``attach()``, the Trainer and accelerate adapters)."""
    if engine.zero_optimization_stage() != 3:
        return (f"needs ZeRO stage 3, not {engine.zero_optimization_stage()} (only ZeRO-3 gathers parameters; at "
                "stages 0-2 every rank holds the whole weights)")
    zc = engine._config.zero_config
    zero = {"offload_param": zc.offload_param, "zero_hpz_partition_size": zc.zero_hpz_partition_size,
            "mics_shard_size": getattr(zc, "mics_shard_size", -1),
            "zero_quantized_weights": zc.zero_quantized_weights,
            "zero_quantized_nontrainable_weights": zc.zero_quantized_nontrainable_weights,
            "stage3_use_all_reduce_for_fetch_params": zc.use_all_reduce_for_fetch_params}
    from dist_sparse.config import packed_gather_refusal

    return packed_gather_refusal(zero, bool(getattr(engine._config, "torch_autocast_enabled", False)))


class _Handles:
    """What the coordinator waits on for one call: DeepSpeed's handle of the dense part and ours of the packed
    part (it waits once per parameter; each handle completes once)."""

    def __init__(self, handles: list):
        self.handles = handles

    def wait(self, handle_dependency: bool = True) -> None:
        for h in self.handles:
            h.wait(handle_dependency=handle_dependency)


class _PackedHandle:
    """The values all-gather in flight; ``wait`` rebuilds every parameter of the list from the gathered bits and
    values and marks it available, as DeepSpeed's ``AllGatherCoalescedHandle.wait`` does for the dense gather."""

    def __init__(self, work, params: list, bits: torch.Tensor, values: torch.Tensor, counts: list, world: int):
        self.work, self.params, self.bits, self.values = work, params, bits, values
        self.counts = counts  # counts[r][j]: active values of parameter j in rank r's payload
        self.world = world
        self.complete = False

    @torch.no_grad()
    def wait(self, handle_dependency: bool = True) -> None:
        if self.complete:
            return
        if self.work is not None:
            self.work.wait()
        bits = self.bits.view(self.world, -1)
        values = self.values.view(self.world, -1)
        byte_at = 0
        value_at = [0] * self.world
        for j, p in enumerate(self.params):
            n = p.ds_tensor.ds_numel
            nb = packed_nbytes(n)
            mask = torch.cat([unpack_bits(bits[r, byte_at: byte_at + nb], n) for r in range(self.world)])
            parts = []
            for r in range(self.world):
                parts.append(values[r, value_at[r]: value_at[r] + self.counts[r][j]])
                value_at[r] += self.counts[r][j]
            full = torch.zeros(self.world * n, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
            full.masked_scatter_(mask, torch.cat(parts))
            p.data = full.narrow(0, 0, p.ds_numel).view(p.ds_shape)
            p.ds_status = _status(p, "AVAILABLE")
            byte_at += nb
        self.bits = self.values = None  # the transient payloads go with the handle's last use
        self.complete = True


class ParamGather(Component):
    """Owns ZeRO-3's parameter gathers of one engine: counts what every gather hands to the collectives, and with
    ``sparsifier`` given (``sparsity.packed_gather``) gathers the sparsified parameters packed. A step component
    only for the name (checkpoints have nothing of it: the masks it reads are the sparsifier's)."""

    name = "param_gather"

    def __init__(self, engine, sparsifier=None, shards=None):
        if engine.zero_optimization_stage() != 3:
            raise ConfigError(KEY, f"needs ZeRO stage 3, not {engine.zero_optimization_stage()}")
        if sparsifier is not None:
            why = engine_refusal(engine)
            if why is not None:
                raise ConfigError(KEY, why)
        self.engine = engine
        self.packed = sparsifier is not None
        # packed shards (compact state + packed_gather, integration/packed_shards.py): the active values are read
        # from the packed store, the parameter has no dense shard
        self.shards = shards
        self.sparsifier = sparsifier
        # the sparsified parameters this rank gathers packed: id -> (name, the shard's mask length)
        self.sparse = {}
        if sparsifier is not None:
            self.sparse = {id(v.param): (v.name, v.mask_len) for v in sparsifier.views}
        self.handed_bytes = 0  # what this rank handed to parameter all-gathers (training mode)
        self.dense_bytes = 0  # what DeepSpeed's dense gather of the same lists hands
        self.gathers = 0  # collective calls that gathered at least one parameter (training mode)
        self.packed_params_gathered = 0
        for p in engine.module.parameters():
            if hasattr(p, "ds_tensor") and hasattr(p, "all_gather_coalesced"):
                patches.replace(p, "all_gather_coalesced", self._replacement(p.all_gather_coalesced),
                                by="ParamGather: count ZeRO-3 parameter gathers; sparsity.packed_gather: sparsified "
                                   "parameters gathered as mask bits + active values")

    def _replacement(self, original):
        def all_gather_coalesced(params, safe_mode: bool = False, quantize: bool = False):
            return self._gather(original, list(params), safe_mode, quantize)
        return all_gather_coalesced

    @staticmethod
    def _gathering(p) -> bool:
        """Whether DeepSpeed's gather of ``p`` communicates (a partition group of one rank does not)."""
        return D.world_size(p.ds_process_group) > 1

    @staticmethod
    def _dense_bytes(p, quantize: bool) -> int:
        """What DeepSpeed's dense gather hands for ``p``: its shard (hpZ: the secondary shard) in the all-gather
        dtype (a torch-autocast communication dtype when set; int8 when quantized, scales not counted)."""
        shard = p.ds_secondary_tensor if p.ds_secondary_tensor is not None else p.ds_tensor
        numel = shard.ds_numel if hasattr(shard, "ds_numel") else shard.numel()
        return numel * (1 if quantize else _itemsize(getattr(p, "comm_dtype", p.ds_tensor.dtype)))

    def _gather(self, original, params: list, safe_mode: bool, quantize: bool):
        counting = self.engine.module.training
        mine = [p for p in params if id(p) in self.sparse and not quantize and self._gathering(p)]
        ids = {id(p) for p in mine}
        rest = [p for p in params if id(p) not in ids]
        if self.shards is not None and any(self.shards.is_packed(p) for p in rest):
            # a packed shard has no dense data for DeepSpeed's gather; only a quantized gather would send one
            # there, and zero_quantized_weights is refused with packed_gather (config check and engine_refusal)
            raise RuntimeError("a packed parameter shard reached DeepSpeed's dense (quantized) gather: "
                               f"{[self.sparse[id(p)][0] for p in rest if self.shards.is_packed(p)][:3]}")
        handles = []
        if rest:
            handles.append(original(rest, safe_mode=safe_mode, quantize=quantize))
            if counting:
                moved = sum(self._dense_bytes(p, quantize) for p in rest if self._gathering(p))
                self.handed_bytes += moved
                self.dense_bytes += moved
                self.gathers += int(moved > 0)
        by_dtype: dict = {}
        for p in sorted(mine, key=lambda q: q.ds_id):  # every rank lays out the payload in the same order
            by_dtype.setdefault(p.ds_tensor.dtype, []).append(p)
        for dtype in sorted(by_dtype, key=str):
            handle, handed, dense = self._packed(by_dtype[dtype])
            handles.append(handle)
            if counting:
                self.handed_bytes += handed
                self.dense_bytes += dense
                self.gathers += 1
                self.packed_params_gathered += len(by_dtype[dtype])
        return handles[0] if len(handles) == 1 else _Handles(handles)

    @torch.no_grad()
    def _packed(self, params: list):
        """Start the packed gather of ``params`` (one dtype, ``ds_id`` order); returns the handle, the bytes this
        rank hands to the two collectives and what DeepSpeed's dense gather would."""
        for p in params:
            if p.ds_status != _status(p, "NOT_AVAILABLE"):
                raise RuntimeError(f"packed gather of a parameter that is not partitioned: {p.ds_summary()}")
            p.ds_status = _status(p, "INFLIGHT")
        group = params[0].ds_process_group
        world = D.world_size(group)
        device = params[0].ds_tensor.device
        own_bits, own_values = [], []
        for p in params:
            name, mask_len = self.sparse[id(p)]
            n = p.ds_tensor.ds_numel
            bits = self.sparsifier.packed[name].to(device)  # the current mask of this rank's shard
            pad = packed_nbytes(n) - bits.numel()  # the last rank's shard is shorter than n: padding bits are 0
            own_bits.append(torch.cat([bits, bits.new_zeros(pad)]) if pad else bits)
            if self.shards is not None and self.shards.is_packed(p):
                own_values.append(self.shards.values_of(p).to(device))
                continue
            mask = unpack_bits(bits, mask_len) if mask_len else torch.zeros(0, dtype=torch.bool, device=device)
            own_values.append(p.ds_tensor.data.view(-1).narrow(0, 0, mask_len)[mask])
        mine = torch.cat(own_bits)
        gathered_bits = torch.empty(world * mine.numel(), dtype=torch.uint8, device=device)
        D.all_gather_flat(gathered_bits, mine, group)
        # every rank's count per parameter, from its bits: the values payload is padded to the largest total
        table = _POPCOUNT.to(device)
        counts = []
        for row in gathered_bits.view(world, -1):
            at, per_param = 0, []
            for p in params:
                nb = packed_nbytes(p.ds_tensor.ds_numel)
                per_param.append(table[row[at: at + nb].long()].sum())
                at += nb
            counts.append(per_param)
        counts = torch.stack([torch.stack(c) for c in counts]).tolist()
        longest = max(sum(c) for c in counts)
        dtype = params[0].ds_tensor.dtype
        payload = torch.zeros(longest, dtype=dtype, device=device)
        values = torch.cat(own_values)
        payload[: values.numel()] = values
        gathered_values = torch.empty(world * longest, dtype=dtype, device=device)
        work = D.all_gather_flat(gathered_values, payload, group, async_op=True) if longest else None
        handed = mine.numel() + longest * _itemsize(dtype)
        dense = sum(p.ds_tensor.ds_numel for p in params) * _itemsize(dtype)
        return _PackedHandle(work, params, gathered_bits, gathered_values, counts, world), handed, dense

    # -- reporting ---------------------------------------------------------------------------------------------
    def stats(self, steps: int) -> dict:
        """Per-rank means over ``steps`` optimizer steps."""
        steps = max(1, steps)
        return {"param_gather_bytes_per_step": self.handed_bytes / steps,
                "dense_param_gather_bytes_per_step": self.dense_bytes / steps,
                "packed": self.packed, "gathers_per_step": self.gathers / steps,
                "packed_params_gathered": self.packed_params_gathered}
