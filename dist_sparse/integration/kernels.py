"""Sparse kernels inside the training step: sparsified Linear/Conv1D layers multiply by their active weights only.

``sparsity.kernel`` picks, per sparsified layer, how its forward runs:

- ``dense``: the masked weight through the module's own dense matmul (what every run did before);
- ``block_sparse``: ``dist_sparse.linear.block_sparse_linear`` over the active ``block:HxW`` blocks (CPU path or
  Triton kernels, following the device): forward and dX from the active blocks, dW for the active blocks only, and
  the dense dW on the steps whose plan says ``dense_grad`` (RigL's update steps and growth window);
- ``semi_structured``: 2:4 sparse tensor cores (``dist_sparse.linear.semi_structured``; CUDA only);
- ``auto``: block patterns are timed once at start on rank 0, per distinct layer shape (dense matmul vs the
  operator, forward + backward, interleaved), and run ``block_sparse`` where it measured faster; 2:4 runs
  ``semi_structured`` on CUDA; everything else runs ``dense``. Rank 0's choice is broadcast, logged and saved with
  checkpoints (this component's ``state_dict``), so every rank and every resume runs the same kernels.

The operator's output equals the masked dense product (the pruned weights are exactly 0 in the model), so a run
with kernels follows the dense-kernel run to within float rounding; the gradient DeepSpeed reduces has the weight's
shape, with zeros outside the active blocks (the sparsifier zeroes pruned gradients anyway).

As a step component (``dist_sparse.step``): ``before_forward(plan)`` hands each layer ``plan.dense_grad`` and, after
a mask update (or a checkpoint load), rebuilds the block indices from the full masks (one all-gather per layer: the
masks are partitioned like the weights at ZeRO-1/2, and like the parameter shards at ZeRO-3).

ZeRO-3: the replaced forward runs inside ``nn.Module.__call__``, after DeepSpeed's pre-forward hook has gathered the
module's weight, so the operator reads the whole weight there; it keeps only the packed active blocks for its
backward (not the weight), and returns dW in the weight's full shape, which DeepSpeed's gradient hooks
reduce-scatter into the shards as they do for a dense matmul's. 2:4's semi-structured kernels stay at ZeRO 0-2.

Weights between steps: with compact state they are held as their active values, at ZeRO-3 with ``packed_gather``
(the packed shards), at ZeRO-1/2 always (:mod:`~dist_sparse.integration.packed_weights`: DeepSpeed's flat buffer is
replaced by one storing the held weights' active values, and the forward reads its blocks from there). Without
compact state the weights stay dense (DeepSpeed's masters are dense then too) and the forward packs the active
blocks from the dense weight (a gather of the density's share of it).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from dist_sparse import distributed as D
from dist_sparse.errors import ConfigError
from dist_sparse.linear import BlockIndex, block_sparse_linear
from dist_sparse.linear.semi_structured import semi_structured_available, semi_structured_linear
from dist_sparse.step import Component

log = logging.getLogger("dist_sparse")

__all__ = ["SparseKernels", "build_kernels", "kernel_work"]

# auto: block_sparse must measure at least this much faster than dense (a margin against timing noise, which on a
# shared machine easily reaches a few percent between two runs of the same thing)
_AUTO_MARGIN = 0.95
_AUTO_REPS = 3


class _Layer:
    """One sparsified module: what its replaced forward reads (kind, index or mask, the step's dense_grad)."""

    def __init__(self, name: str, module, transposed: bool):
        self.name, self.module, self.transposed = name, module, transposed
        self.kind = "dense"
        self.index: BlockIndex | None = None
        self.mask: torch.Tensor | None = None  # (out, in) 2:4 mask of semi_structured layers
        self.dense_grad = False
        self.original_forward = module.forward
        self.held = None  # PackedWeights holding this layer's weight as its active blocks (ZeRO-1/2)

    def forward(self, x):
        m = self.module
        if self.kind == "block_sparse":
            if self.held is not None:  # the weight is a placeholder: the blocks come from the packed buffer
                index, blocks = self.held.blocks(self.name)
                return block_sparse_linear(x, m.weight, m.bias, index, transposed=self.transposed,
                                           dense_grad=self.dense_grad, packed=blocks)
            return block_sparse_linear(x, m.weight, m.bias, self.index, transposed=self.transposed,
                                       dense_grad=self.dense_grad)
        w = m.weight.t() if self.transposed else m.weight
        return semi_structured_linear(x, w, m.bias, self.mask, dense_grad=self.dense_grad)

    def set_kind(self, kind: str) -> None:
        self.kind = kind
        # an instance attribute shadows the class's forward; nn.Module.__call__ (and DeepSpeed's hooks around it)
        # still run as before
        self.module.forward = self.original_forward if kind == "dense" else self.forward


class SparseKernels(Component):
    """The step component that runs sparsified layers on sparse kernels (see the module docstring)."""

    name = "kernels"

    def __init__(self, sparsifier, layers: list, block_shape, setting: str, tokens: int, group=None):
        self.sparsifier, self.layers, self.block_shape = sparsifier, layers, block_shape
        self.setting, self.tokens, self.group = setting, tokens, group
        self._seen_updates = None  # sparsifier.updates_done when the indices were built
        self.timings: dict = {}  # auto: shape key -> (dense s, block_sparse s), rank 0's measurement

    # -- choice ----------------------------------------------------------------------------------------------------
    def layer_kernel(self) -> dict:
        """name -> dense | block_sparse | semi_structured (``summary.json``'s ``layer_kernel``)."""
        return {lay.name: lay.kind for lay in self.layers}

    def choose(self, pattern) -> None:
        """Decide every layer's kernel (rank 0 measures for ``auto``), broadcast, log, install. A collective."""
        self.refresh()
        kinds = None
        if D.rank(self.group) == 0:
            kinds = {lay.name: self._decide(lay, pattern) for lay in self.layers}
        kinds = D.all_gather_object(kinds, self.group)[0]
        self._install(kinds)
        if D.rank(self.group) == 0:
            counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
            log.info("sparsity.kernel=%s: %s%s", self.setting, ", ".join(f"{n} layers {k}" for k, n in counts.items()),
                     "".join(f"; {key}: dense {d * 1e3:.1f} ms, block_sparse {s * 1e3:.1f} ms"
                             for key, (d, s) in self.timings.items()))

    def _decide(self, lay: _Layer, pattern) -> str:
        if self.setting in ("dense", "block_sparse", "semi_structured"):
            return self.setting
        if pattern.nm == (2, 4):
            w = lay.module.weight
            return "semi_structured" if semi_structured_available(w.device, w.dtype) is None else "dense"
        if pattern.block_shape is None:
            return "dense"
        key = f"{lay.index.shape[0]}x{lay.index.shape[1]}{'T' if lay.transposed else ''}@{lay.index.density:.3f}"
        if key not in self.timings:
            self.timings[key] = self._measure(lay)
        dense, sparse = self.timings[key]
        return "block_sparse" if sparse < _AUTO_MARGIN * dense else "dense"

    def _measure(self, lay: _Layer) -> tuple[float, float]:
        """Median seconds of one forward + backward (dX and the sampled dW) of this layer's shape at its layout,
        dense matmul vs the operator, alternating."""
        w0 = lay.module.weight  # its device and dtype (at ZeRO-3 its data is this rank's partition, or empty)
        out_in = tuple(lay.index.shape)
        gen = torch.Generator(device=w0.device).manual_seed(0)
        w = torch.randn(out_in[::-1] if lay.transposed else out_in, generator=gen, device=w0.device,
                        dtype=w0.dtype).requires_grad_()
        x = torch.randn(self.tokens, lay.index.shape[1], generator=gen, device=w0.device,
                        dtype=w0.dtype).requires_grad_()
        dy = torch.randn(self.tokens, lay.index.shape[0], generator=gen, device=w0.device, dtype=w0.dtype)
        w_oi = (lambda: w.t()) if lay.transposed else (lambda: w)
        runs = {"dense": lambda: F.linear(x, w_oi()),
                "sparse": lambda: block_sparse_linear(x, w, None, lay.index, transposed=lay.transposed)}
        times = {k: [] for k in runs}
        sync = torch.cuda.synchronize if w0.is_cuda else (lambda: None)
        for rep in range(_AUTO_REPS + 1):  # the first round warms up
            for k, fn in runs.items():
                sync()
                start = time.perf_counter()
                torch.autograd.grad(fn(), (x, w), dy)
                sync()
                if rep:
                    times[k].append(time.perf_counter() - start)
        return statistics.median(times["dense"]), statistics.median(times["sparse"])

    def _install(self, kinds: dict) -> None:
        for lay in self.layers:
            kind = kinds[lay.name]
            if kind == "semi_structured":
                why = semi_structured_available(lay.module.weight.device, lay.module.weight.dtype)
                if why is not None:
                    raise ConfigError("sparsity.kernel", f"semi_structured for {lay.name}: {why}")
            lay.set_kind(kind)

    # -- masks -> indices --------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild every layer's block index (and 2:4 mask) from the full masks. A collective."""
        for lay in self.layers:
            if lay.held is not None:  # the held weight's index, rebuilt with its layout at every mask change
                lay.index = lay.held.index(lay.name)
                continue
            full = self.sparsifier.full_mask(lay.name)
            oriented = full.t() if lay.transposed else full
            if self.block_shape is not None:
                lay.index = BlockIndex.from_mask(oriented, self.block_shape)
            else:  # 2:4: the semi-structured kernels take the (out, in) mask itself
                lay.mask = oriented.to(lay.module.weight.device)
        self._seen_updates = self.sparsifier.updates_done

    def hold(self, held) -> None:
        """The layers ``held`` (:class:`~dist_sparse.integration.packed_weights.PackedWeights`) stores as blocks
        read their blocks, and their index, from it from now on."""
        for lay in self.layers:
            if lay.name in held.held:
                lay.held, lay.index = held, held.index(lay.name)

    def before_forward(self, plan) -> None:
        if not any(lay.kind != "dense" for lay in self.layers):
            return
        if self._seen_updates != self.sparsifier.updates_done:
            self.refresh()
        for lay in self.layers:
            lay.dense_grad = bool(plan.dense_grad)

    # -- reporting and checkpoints -------------------------------------------------------------------------------
    def work_fractions(self, dense_grad: bool) -> tuple[dict, dict]:
        """Per layer, the fraction of the dense product's multiply-adds its kernel does: ``(forward and dX, dW)``.
        Dense kernels 1.0; block_sparse the active-block share (dW: 1.0 on dense-gradient steps); 2:4 0.5 forward
        and dX (dX is dense unless the mask is transposable; counted at 0.5 only then), dW a dense product."""
        fwd, dw = {}, {}
        for lay in self.layers:
            if lay.kind == "block_sparse":
                fwd[lay.name] = lay.index.density
                dw[lay.name] = 1.0 if dense_grad else lay.index.density
            elif lay.kind == "semi_structured":
                from dist_sparse.linear.semi_structured import transposable

                fwd[lay.name] = 0.75 if not transposable(lay.mask) else 0.5  # forward 0.5, dX 1 or 0.5
                dw[lay.name] = 1.0
            else:
                fwd[lay.name] = dw[lay.name] = 1.0
        return fwd, dw

    def state_dict(self) -> dict:
        return {"setting": self.setting, "layer_kernel": self.layer_kernel()}

    def load_state_dict(self, state: dict) -> None:
        """A resume runs the kernels the run started with (auto's measurement is not repeated); a layer the
        checkpoint does not name keeps its current kernel."""
        saved = state.get("layer_kernel", {})
        self._install({lay.name: saved.get(lay.name, lay.kind) for lay in self.layers})
        self._seen_updates = None  # the loaded masks may differ: rebuild the indices before the next forward


def build_kernels(engine, model, sparsifier, sparsity, tokens: int | None = None):
    """The kernels component for ``sparsity.kernel`` (None when every layer stays dense without choosing: no
    method, or ``kernel: dense``). ``tokens``: tokens per micro-batch, for ``auto``'s measurement (default 1024)."""
    from dist_sparse.integration.hf import stored_transposed

    method = sparsifier.method
    if method is None or sparsity.kernel == "dense" or not sparsifier.views:
        return None
    if method.dense_weights:  # straight-through methods need the gradient of pruned weights on every step
        if sparsity.kernel != "auto":
            raise ConfigError("sparsity.kernel", f"{sparsity.kernel!r}: method {method.name!r} trains dense weights "
                                                 "(gradients at pruned positions every step); use kernel: dense")
        return None
    pattern = method.pattern
    if engine.zero_optimization_stage() == 3 and (sparsity.kernel == "semi_structured" or pattern.nm == (2, 4)):
        if sparsity.kernel == "semi_structured":  # also refused by the config check; this guards attach() directly
            raise ConfigError("sparsity.kernel", "'semi_structured' is supported with ZeRO stages 0-2, not 3")
        return None
    if pattern.block_shape is None and pattern.nm != (2, 4):
        if sparsity.kernel != "auto":
            raise ConfigError("sparsity.kernel", f"{sparsity.kernel!r} needs a matching sparsity.pattern, got "
                                                 f"{pattern.spec!r}")
        return None
    modules = dict(model.named_modules())
    names = [v.name for v in sparsifier.views]
    transposed = stored_transposed(model, names)
    layers = []
    for name in names:
        module = modules.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        weight = getattr(module, "weight", None)
        # at ZeRO-3 the weight's data is this rank's shard; ds_shape is the whole weight's
        if weight is None or len(getattr(weight, "ds_shape", weight.shape)) != 2:
            continue  # fused experts (3-D) and other parameters keep their own forward
        layers.append(_Layer(name, module, name in transposed))
    kernels = SparseKernels(sparsifier, layers, pattern.block_shape, sparsity.kernel, tokens or 1024)
    kernels.choose(pattern)
    return kernels


def kernel_work(engine, dense_grad: bool) -> tuple[dict, dict]:
    """For every sparsified parameter, the share of the dense product its kernel multiplies: ``(forward and dX,
    dW)`` (1.0 for masked layers on dense kernels: the zeros are multiplied too). For the FLOPs estimate."""
    names = [v.name for v in engine.sparsifier.views]
    fwd, dw = engine.kernels.work_fractions(dense_grad) if engine.kernels is not None else ({}, {})
    return {n: fwd.get(n, 1.0) for n in names}, {n: dw.get(n, 1.0) for n in names}
