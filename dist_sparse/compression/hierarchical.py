"""Compression between nodes only (``compression.scope: inter_node``): dense inside a node, compressed across.

Inside a node the links are fast (NVLink, shared memory); between nodes they are the bottleneck. So with N nodes of
L ranks each (rank order does not matter, the layout comes from the ranks' node names):

1. **intra-node, dense**: the L ranks of a node sum their local gradients (one bucketed all-reduce in fp32) and
   divide by L: every rank of the node then holds the node's mean gradient, the "local" gradient of that node as a
   worker of the compressed exchange (what error feedback accumulates, DGC's local clipping clips, and Adam's
   momentum correction keeps its moments of).
2. **inter-node, compressed**: local rank i of every node forms a group of N ranks (one per node) and exchanges
   *slice i* of every tensor with the usual compressor, error feedback, masks and momentum correction
   (:class:`~dist_sparse.compression.gradient.GradientCompression` on that group). At ZeRO-1/2 slice i is the
   union of the partitions of those N ranks, and each of them keeps its own partition local, exactly as the flat
   scope does on the whole world: after the exchange each rank holds the global mean over its own partition, which
   is all its optimizer steps. At ZeRO-0 (every rank steps everything) slice i is the i-th of L contiguous chunks of
   each tensor, and
3. **intra-node, dense (ZeRO-0 only)**: the L ranks of a node sum their slices (0 outside them) to get the whole
   averaged gradient (adding zeros: exact).

The mean of node means is the mean over all ranks (equal ranks per node are required). Density applies to each
slice: a rank sends ``density`` x the unpruned coordinates of its slice, so a node sends ``density`` x the
unpruned coordinates of the model per exchange, and the bytes between nodes fall by the ranks per node relative to
the flat scope. With one node there is nothing to cross: the dense intra-node mean is the global mean and nothing
is compressed (logged at start).

Byte accounting follows the rest of the project: bytes a rank hands to collectives, per optimizer step; a
collective whose group spans more than one node counts as inter-node, one inside a node as intra-node.
"""

import logging
from dataclasses import dataclass

import torch

from dist_sparse import distributed as D
from dist_sparse.compression.gradient import GradientCompression
from dist_sparse.errors import ConfigError

log = logging.getLogger("dist_sparse")

SCOPES = ("all", "inter_node")


@dataclass(frozen=True)
class NodeLayout:
    """Which node each rank runs on (``nodes_of_ranks[r]``: rank r's node name)."""

    nodes_of_ranks: tuple

    @property
    def node_names(self) -> list:
        return sorted(set(self.nodes_of_ranks), key=self.nodes_of_ranks.index)  # in order of their first rank

    @property
    def nodes(self) -> int:
        return len(set(self.nodes_of_ranks))

    def ranks_of(self, node: str) -> list:
        return [r for r, n in enumerate(self.nodes_of_ranks) if n == node]

    def local_index(self, rank: int) -> int:
        return self.ranks_of(self.nodes_of_ranks[rank]).index(rank)

    @property
    def ranks_per_node(self) -> int:
        counts = {len(self.ranks_of(n)) for n in self.node_names}
        if len(counts) != 1:
            per = {n: len(self.ranks_of(n)) for n in self.node_names}
            raise ConfigError("compression.scope", f"inter_node needs the same number of ranks on every node, "
                                                   f"got {per}")
        return counts.pop()

    def intra_members(self) -> list:
        """One list per node: its ranks."""
        return [self.ranks_of(n) for n in self.node_names]

    def inter_members(self) -> list:
        """One list per local index i: local rank i of every node, in node order."""
        per_node = self.intra_members()
        return [[ranks[i] for ranks in per_node] for i in range(self.ranks_per_node)]

    def signature(self) -> str:
        """What a checkpoint's residuals depend on (they are per rank of this layout)."""
        return f"{self.nodes}x{self.ranks_per_node}"


class _Slices:
    """name -> bool mask of this rank's slice (built when asked: one tensor's mask exists at a time)."""

    def __init__(self, ranges: dict, numels: dict, device):
        self.ranges, self.numels, self.device = ranges, numels, device

    def get(self, name: str, default=None):
        if name not in self.ranges:
            return default
        out = torch.zeros(self.numels[name], dtype=torch.bool, device=self.device)
        for start, length in self.ranges[name]:
            out[start: start + length] = True
        return out


def chunk(numel: int, parts: int, i: int) -> tuple:
    """(start, length) of the i-th of ``parts`` contiguous, nearly equal chunks of ``numel`` elements."""
    bounds = [numel * j // parts for j in range(parts + 1)]
    return bounds[i], bounds[i + 1] - bounds[i]


class InterNodeCompression:
    """The exchange of ``compression.scope: inter_node`` (see the module docstring). Same ``run`` signature and
    the attributes of :class:`GradientCompression` that the engine reads (``feedback``, ``cfg``, ``last_sent``),
    plus ``intra_bytes`` / ``inter_bytes``, the bytes this rank handed to each kind of collective so far."""

    def __init__(self, cfg, seed: int, layout: NodeLayout, **kwargs):
        self.cfg = cfg
        self.layout = layout
        me = D.rank()
        self.local_index = layout.local_index(me)
        self.ranks_per_node = layout.ranks_per_node
        self.inter_ranks = layout.inter_members()[self.local_index]  # my group: local rank i of every node
        # every rank creates every group in the same order (torch.distributed's rule)
        self.intra_group = D.subgroup(layout.intra_members())
        self.inter_group = D.subgroup(layout.inter_members())
        self.inner = GradientCompression(cfg, seed, group=self.inter_group, **kwargs)
        self.intra_bytes = 0
        self.inter_bytes = 0
        if layout.nodes == 1:
            log.warning("compression.scope: inter_node on a single node (%d ranks): gradients are averaged dense "
                        "within the node and nothing is compressed", self.ranks_per_node)

    @property
    def feedback(self):
        return self.inner.feedback

    @property
    def last_sent(self) -> dict:
        return self.inner.last_sent

    @property
    def total_bytes(self) -> int:
        return self.intra_bytes + self.inter_bytes

    @torch.no_grad()
    def run(self, grads: dict, eligible: dict, step: int, dense=(), skip=(), owned: dict | None = None,
            dense_applied: bool = False) -> dict:
        """The global average of every tensor in ``grads`` except ``skip`` (complete over this rank's own range
        when ``owned`` is given, ZeRO-1/2; complete everywhere otherwise). ``grads`` entries are replaced by the
        node means (fp32), which is what this node contributed: the caller's momentum correction reads them."""
        names = [n for n in grads if n not in skip]
        for n in names:  # fp32 node sums, in place where the gradient already is an fp32 buffer of its own
            g = grads[n].reshape(-1)
            grads[n] = g if g.dtype == torch.float32 else g.float()
        self.intra_bytes += D.all_reduce_sum_flat([grads[n] for n in names], self.intra_group)
        for n in names:
            grads[n].div_(self.ranks_per_node)
        if self.layout.nodes == 1:  # the node mean is the global mean: nothing crosses a node
            return {n: grads[n] for n in names}
        device = grads[names[0]].device if names else torch.device("cpu")
        numels = {n: grads[n].numel() for n in names}
        if owned is not None:  # ZeRO-1/2: the slice is the union of the group's partitions; each keeps its own
            group_owned = {n: [owned[n][r] for r in self.inter_ranks] for n in names}
            slices = _Slices(group_owned, numels, device)
        else:
            group_owned = None
            slices = _Slices({n: [chunk(numels[n], self.ranks_per_node, self.local_index)] for n in names}, numels,
                             device)
        before = self.inner.total_bytes
        averaged = self.inner.run(grads, eligible, step, dense, skip, owned=group_owned, within=slices,
                                   dense_applied=dense_applied)
        self.inter_bytes += self.inner.total_bytes - before
        if owned is None:  # ZeRO-0: every rank needs every slice; each is 0 outside its own, so the sum is exact
            self.intra_bytes += D.all_reduce_sum_flat([averaged[n] for n in names], self.intra_group)
        return averaged


def build(cfg, seed: int, layout: NodeLayout, **kwargs):
    """The exchange for ``cfg.scope``: :class:`GradientCompression` on the world, or :class:`InterNodeCompression`."""
    if cfg.scope == "inter_node":
        return InterNodeCompression(cfg, seed, layout, **kwargs)
    return GradientCompression(cfg, seed, **kwargs)


def split_bytes(comp, layout: NodeLayout) -> tuple:
    """(intra-node, inter-node) bytes this rank handed to the exchange so far: the flat scope's collectives span
    the world, so they cross nodes whenever there is more than one."""
    if isinstance(comp, InterNodeCompression):
        return comp.intra_bytes, comp.inter_bytes
    return (comp.total_bytes, 0) if layout.nodes == 1 else (0, comp.total_bytes)
