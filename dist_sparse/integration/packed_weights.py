"""Weights held as their active blocks at ZeRO-1/2: compact state + block-sparse kernels keep no dense weight.

DeepSpeed's ZeRO-1/2 optimizer (``deepspeed/runtime/zero/stage_1_and_2.py``, 0.19.8) keeps the model's
low-precision weights whole on every rank: per optimizer group one flat buffer ``bit16_groups_flat[i]``, every
parameter's ``.data`` a view into it, each rank's partition (``parallel_partitioned_bit16_groups[i][r]``) written
from the fp32 master after the step and all-gathered into the others' buffers. With compact state
(``sparsity.compact_state: true``) the master is packed already (only active positions), and a layer on the
block-sparse kernel (``sparsity.kernel``) multiplies by its active blocks only, so the dense weight of such a layer
is needed by nothing: :class:`PackedWeights` replaces the flat buffer by one that stores

- a *held* parameter (a sparsified Linear/Conv1D weight running ``block_sparse``, whose shape is a whole number of
  blocks) as its active values only, in the order of its mask bits (row-major over the weight as it is stored), the
  layout compact state's packed master has;
- every other parameter densely, as DeepSpeed did (views of the new buffer, so embeddings, norms and dense-kernel
  layers read their ``.data`` as before).

A rank's packed partition is its fragments' stored values in fragment order, so the whole buffer is the ranks'
packed partitions one after another and each parameter's stored values are one contiguous run of it. After every
optimizer step, mask change and checkpoint load, each rank writes its partition from the packed fp32 master
(``cast(master)``: exactly what DeepSpeed's "fp32 -> lp partition" copy writes) and the partitions are exchanged
(:func:`dist_sparse.distributed.all_gather_runs`: the partitions differ in size, so each is padded to the longest
for one all-gather, then copied into its place; the receive buffer is bounded, longer partitions go in rounds).
The exchange carries only the held parameters' active values, where DeepSpeed's all-gather carries them densely.

A held parameter's ``.data`` is a NaN placeholder of its full shape (one element, expanded), so that autograd,
DeepSpeed's gradient hooks (which read ``numel()`` and ``.grad``) and the operator's shape checks work unchanged,
and a read of it by code that bypasses this module shows up as NaN instead of silently wrong weights. What reads
the weight goes through here instead:

- the kernel's forward: :meth:`PackedWeights.blocks` turns the active values into the operator's ``(nnz, bh, bw)``
  block format (one gather of the density's share of the weight, computed from the block index: no per-element
  index is kept);
- ``module.state_dict()`` (checkpoints, ``save_pretrained``, the Trainer integrations): a state-dict hook puts the
  dense weight there (zeros outside the active blocks), built from the blocks;
- ``module.load_state_dict()``: the held weights get a dense tensor for the load, and their active values are taken
  from it afterwards (as DeepSpeed's own ZeRO-1/2 loads into the model: the fp32 master does not follow; a resume
  installs the masters from the checkpoint and writes the weights from them);
- the sparsifier's ``zero_model_`` skips them: a held parameter stores no pruned position.

Held masks must be exactly block-structured (every position of an active block active), which the ``block:HxW``
patterns guarantee; a mask that is not (a hand-made ``init_masks`` file, say) is refused with an error naming the
layer. Frozen weights (``freeze.fraction``) keep the dense buffer: their values live only in the low-precision
weights.

This module does not import deepspeed; it knows the attributes of ``DeepSpeedZeroOptimizer`` listed above.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_sparse import distributed as D
from dist_sparse.compact.packed import PackedPartition
from dist_sparse.errors import DistSparseError
from dist_sparse.integration import patches
from dist_sparse.linear import BlockIndex

__all__ = ["PackedWeights", "PackedWeightError", "held_layers"]


class PackedWeightError(DistSparseError, RuntimeError):
    """A held weight's mask is not block-structured, so its active values are not whole blocks (names the layer)."""


def held_layers(kernels) -> list:
    """The kernels' layers whose weights can be held as blocks: on ``block_sparse``, a whole number of blocks."""
    if kernels is None:
        return []
    return [lay for lay in kernels.layers if lay.kind == "block_sparse" and lay.index is not None
            and not lay.index.padded]


def _block_bases(index: BlockIndex, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where block ``b``'s element ``(i, c)`` (output row ``i``, input column ``c`` inside the block) sits in the
    weight's active values in mask order: ``base[b] + i * step_i[b] + c * step_c[b]``. The values are row-major over
    the weight as it is stored: ``(out, in)``, or ``(in, out)`` for Conv1D (``transposed``)."""
    bh, bw = index.block
    layout = index.layout
    rows, cols = index.rows, index.cols
    if not transposed:  # a stored row of block row R holds its k_R active blocks' bw columns in block order
        k = layout.sum(1)
        chunk = torch.cumsum(k * bh * bw, 0) - k * bh * bw
        first = torch.cumsum(k, 0) - k  # the first block of each block row in the row-major block list
        j = torch.arange(index.nnz) - first[rows]
        base = chunk[rows] + j * bw
        return base, k[rows] * bw, torch.ones_like(base)
    # Conv1D: a stored row is an input feature; block column C holds k_C active blocks, ordered by block row
    k = layout.sum(0)
    chunk = torch.cumsum(k * bh * bw, 0) - k * bh * bw
    rank_in_col = torch.cumsum(layout.to(torch.int64), 0) - 1  # (nr, nc): position among the column's blocks
    j = rank_in_col[rows, cols]
    base = chunk[cols] + j * bh
    return base, torch.ones_like(base), k[cols] * bh


class _Held:
    """One held parameter: its layer, block index and where its values sit in the group's buffer."""

    def __init__(self, name: str, param, layer):
        self.name, self.param, self.layer = name, param, layer
        self.shape = tuple(param.shape)
        self.group = None
        self.offset = 0
        self.count = 0
        self.index: BlockIndex | None = None
        self.bases = None  # _block_bases of the index, on the values' device
        self.loading = False  # between a module load's pre- and post-hook: .data is a dense tensor


class PackedWeights:
    """The packed low-precision weights of one engine's ZeRO-1/2 optimizer (see the module docstring). ``store``:
    the engine's :class:`~dist_sparse.integration.compact_zero.CompactZeroState`; ``layers``: the kernels' layers
    to hold (:func:`held_layers`)."""

    def __init__(self, store, layers: list):
        self.store = store
        self.zo = zo = store.zo
        self.sparsifier = store.sparsifier
        module = store.engine.module
        self.names = {id(p): n for n, p in module.named_parameters()}
        params = dict(module.named_parameters())
        self.held = {lay.name: _Held(lay.name, params[lay.name], lay) for lay in layers}
        self.lp_dtype = zo.bit16_groups_flat[0].dtype if zo.bit16_groups_flat else torch.float32
        self.device = store.lp_parts[0].device if store.lp_parts else torch.device("cpu")
        self.placeholder = torch.full((1,), float("nan"), dtype=self.lp_dtype, device=self.device)
        self.flats: list = [None] * len(store.parts)
        self.layout: list = [None] * len(store.parts)  # per group: per rank (offset, count) of its partition
        for i, group in enumerate(zo.round_robin_bit16_groups):
            for p in group:
                name = self.names.get(id(p))
                if name in self.held:
                    self.held[name].group = i
        missing = [n for n, h in self.held.items() if h.group is None]
        if missing:
            raise RuntimeError(f"packed weights: {missing[0]} is in no ZeRO-1/2 optimizer group")
        self._install()
        self.refresh()

    # -- layout --------------------------------------------------------------------------------------------------
    def is_held(self, param) -> bool:
        name = self.names.get(id(param))
        return name is not None and name in self.held

    def _stored(self, i: int) -> list:
        """This rank's fragments of group ``i`` as (name, stored count): held ones their active values."""
        part = self.store.parts[i]
        return [(f.name, part.offsets[k + 1] - part.offsets[k] if f.name in self.held else f.length)
                for k, f in enumerate(part.fragments)]

    @torch.no_grad()
    def _relayout(self) -> None:
        """The held weights' block indices (from the full masks) and every group's buffer layout (from every
        rank's stored counts); a new buffer per group, the dense parameters re-pointed into it. A collective."""
        for h in self.held.values():
            full = self.sparsifier.full_mask(h.name)  # the stored orientation
            index = BlockIndex.from_mask(full.t() if h.layer.transposed else full, h.layer.index.block)
            bh, bw = index.block
            if int(full.sum()) != index.nnz * bh * bw:
                raise PackedWeightError(
                    f"{h.name}: its mask is not block-structured ({int(full.sum())} active weights in "
                    f"{index.nnz} active {bh}x{bw} blocks), so its weights cannot be held as active blocks "
                    f"(sparsity.compact_state with sparsity.kernel block_sparse at ZeRO-1/2); masks from "
                    f"sparsity.init_masks must follow sparsity.pattern, or set sparsity.kernel: dense")
            h.index, h.bases, h.count = index, None, int(full.sum())
        zo = self.zo
        for i in range(len(self.store.parts)):
            group = zo.real_dp_process_group[i]
            per_rank = D.all_gather_object(self._stored(i), group)
            offsets, at, layout = {}, 0, []
            for frags in per_rank:
                start = at
                for name, n in frags:
                    offsets.setdefault(name, at)  # a parameter's first piece: the ranks' pieces follow in order
                    at += n
                layout.append((start, at - start))
            flat = torch.empty(at, dtype=self.lp_dtype, device=self.device)
            self.flats[i], self.layout[i] = flat, layout
            rank = dist.get_rank(group=group)
            mine = flat.narrow(0, *layout[rank])
            self.store.lp_parts[i] = mine  # what compact state addresses this rank's partition by
            zo.single_partition_of_fp32_groups[i] = mine  # DeepSpeed's "fp32 -> lp" copy stays a self-copy
            zo.parallel_partitioned_bit16_groups[i] = [flat.narrow(0, *lay) for lay in layout]
            zo.bit16_groups_flat[i] = flat
            for p in zo.round_robin_bit16_groups[i]:
                name = self.names.get(id(p))
                if name in self.held:
                    self.held[name].offset = offsets.get(name, 0)
                    p.data = self.placeholder.expand(self.held[name].shape)
                elif p.numel():
                    p.data = flat.narrow(0, offsets[name], p.numel()).view(p.shape)
                hm = getattr(p, "_hp_mapping", None)
                if hm is not None:  # its lp_fragment viewed the old buffer (would keep it alive)
                    hm.lp_fragment = None

    @torch.no_grad()
    def write(self, i: int, master: torch.Tensor) -> None:
        """Group ``i``'s packed fp32 master (current layout) -> this rank's packed partition (held weights: their
        active values; other sparsified ones dense with exact zeros; dense ones whole), then every rank's
        partition into its place in the buffer."""
        part = self.store.parts[i]
        mine = self.store.lp_parts[i]
        at = 0
        for f in part.fragments:
            values = part.slice(master, f.name)
            if f.name in self.held or not f.sparse:
                n = values.numel()
                mine.narrow(0, at, n).copy_(values)
            else:
                n = f.length
                mine.narrow(0, at, n).copy_(PackedPartition.unpack_fragment(values, part.mask_of(f.name).reshape(-1)))
            at += n
        if at != mine.numel():
            raise RuntimeError(f"packed weights: group {i} wrote {at} values into a partition of {mine.numel()}")
        # the others' partitions into their places: one padded all-gather (the partitions differ in size)
        D.all_gather_runs(self.flats[i], self.layout[i], group=self.zo.real_dp_process_group[i])

    @torch.no_grad()
    def write_all(self) -> None:
        for i in range(len(self.store.parts)):
            self.write(i, self.store.master_tensor(i).detach())

    def refresh(self) -> None:
        """After the masks changed (start, mask update, checkpoint load): new layout, weights from the masters."""
        self._relayout()
        self.write_all()

    # -- what reads the held weights -----------------------------------------------------------------------------
    def values(self, name: str) -> torch.Tensor:
        """The active values of held weight ``name`` in mask order (a view of the buffer)."""
        h = self.held[name]
        return self.flats[h.group].narrow(0, h.offset, h.count)

    def index(self, name: str) -> BlockIndex:
        return self.held[name].index

    def _where(self, h: _Held, device) -> torch.Tensor:
        """``(nnz, bh, bw)`` positions of the active blocks' elements in the values (a transient: 8 bytes per
        active weight, so it is computed per call from the per-block bases instead of kept)."""
        if h.bases is None:
            h.bases = tuple(t.to(device) for t in _block_bases(h.index, h.layer.transposed))
        base, step_i, step_c = h.bases
        bh, bw = h.index.block
        ii = torch.arange(bh, device=device)[None, :, None]
        cc = torch.arange(bw, device=device)[None, None, :]
        return base[:, None, None] + ii * step_i[:, None, None] + cc * step_c[:, None, None]

    def blocks(self, name: str) -> tuple[BlockIndex, torch.Tensor]:
        """``(index, (nnz, bh, bw) active blocks)`` of held weight ``name``, in the operator's format."""
        h = self.held[name]
        values = self.values(name)
        return h.index, values[self._where(h, values.device)]

    def dense(self, name: str) -> torch.Tensor:
        """The held weight as a dense tensor of its stored shape (zeros outside the active blocks): a new tensor."""
        index, blocks = self.blocks(name)
        return index.unpack(blocks, self.held[name].layer.transposed, self.lp_dtype)

    @torch.no_grad()
    def take_dense(self, name: str, dense: torch.Tensor) -> None:
        """Store the active values of a dense tensor of held weight ``name``'s stored shape (a module load;
        values outside the active blocks are dropped, as the masks drop them)."""
        h = self.held[name]
        values = self.values(name)
        blocks = h.index.pack(dense.to(values.device, self.lp_dtype), h.layer.transposed)
        values[self._where(h, values.device).reshape(-1)] = blocks.reshape(-1)

    # -- DeepSpeed and nn.Module paths ---------------------------------------------------------------------------
    def _install(self) -> None:
        weights = self
        zo = self.zo

        def update_lp_params():  # DeepSpeed's copy fp32 -> lp partition + all-gather, on the packed buffer
            weights.write_all()

        def update_model_bit16_weights(group_index):  # the parameters already view the packed buffer
            return None

        patches.replace(zo, "update_lp_params", update_lp_params,
                        by="packed weights: the partitions are written and exchanged packed")
        patches.replace(zo, "_update_model_bit16_weights", update_model_bit16_weights,
                        by="packed weights: dense parameters view the packed buffer, held ones are blocks")
        modules = dict(self.store.engine.module.named_modules())
        for name in self.held:
            module = modules[name[: -len(".weight")]]
            module._register_state_dict_hook(self._state_dict_hook(name))
            module.register_load_state_dict_pre_hook(self._load_pre_hook(name))
            module.register_load_state_dict_post_hook(self._load_post_hook(name))

    def _state_dict_hook(self, name: str):
        def hook(module, state_dict, prefix, local_metadata):
            key = prefix + "weight"
            if key in state_dict:
                state_dict[key] = self.dense(name)
            return state_dict
        return hook

    def _load_pre_hook(self, name: str):
        def hook(module, state_dict, prefix, *args):
            if prefix + "weight" in state_dict:  # a real tensor for nn.Module's copy_ to load into
                h = self.held[name]
                h.param.data = self.dense(name)
                h.loading = True
        return hook

    def _load_post_hook(self, name: str):
        def hook(module, incompatible_keys):
            h = self.held[name]
            if h.loading:
                h.loading = False
                self.take_dense(name, h.param.data)
                h.param.data = self.placeholder.expand(h.shape)
        return hook

    # -- accounting ----------------------------------------------------------------------------------------------
    def bytes_held(self) -> list:
        return [f for f in self.flats if f is not None]
