"""Pruning at initialization: ``snip``, ``grasp``, ``synflow``. The mask is chosen once, at step 0 before any
optimizer step, from scores of the initial weights, then kept like ``static``'s.

- :class:`SNIP` (Lee, Ajanthan & Torr, ICLR 2019, "SNIP: single-shot network pruning based on connection
  sensitivity"): the connection sensitivity |g ⊙ w| (g = dL/dw on the training batches; the paper's
  dL/dc at c = 1 for the multiplicative mask c), the highest kept.
- :class:`GraSP` (Wang, Zhang & Grosse, ICLR 2020, "Picking winning tickets before training by preserving gradient
  flow"), Algorithm 1: g = dL/dw over the batches, Hg by double backward (the gradient of g_const · dL/dw), score
  S = -w ⊙ Hg; the *highest* scores are removed (removing them reduces the gradient norm least, or raises it), so
  the selector keeps the highest -S = w ⊙ Hg. Scores are signed; the selector orders either sign exactly.
  g and Hg are taken over the sparsified weights, as the reference implementation does over its prunable layers.
- :class:`SynFlow` (Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020, "Pruning neural networks without any data by
  iteratively conserving synaptic flow"), Algorithm 1: data-free; every parameter replaced by |θ| (in float64, the
  paper's guard against the product of magnitudes overflowing fp32), an all-ones input, R = 1ᵀ(output), score
  θ ⊙ dR/dθ; ``sparsity.init_rounds`` rounds (default 100) prune to density d^(k/n) at round k (the exponential
  schedule), each round scoring the network masked by the previous round. For a language model the all-ones input
  enters *after* the token embedding (``inputs_embeds``: a token id has no all-ones analogue; the position
  embedding is added as the model does). Treatment of what is not a linear layer: every norm (LayerNorm, RMSNorm)
  is evaluated as the affine map x·|γ| (+ |β|), because normalising the all-ones input divides by a zero variance
  and would cut the flow; softmax attention and the MLP's activation are kept as the model computes them (with
  positive inputs and |θ| the activations act on positive values, as ReLU does in the paper's networks, and the
  softmax is a convex average over positions; raising one query-key logit lowers the others' weights, so query and
  key scores can be slightly negative, which the signed selector orders). So the conservation law holds exactly
  along linear paths (a
  layer scaled up and the next one down, e.g. attention's value projection and its output projection, leaves the
  scores unchanged; tested) and only approximately across the softmax's exponent and the activation.

Selection is global by default (one threshold over every sparsified layer, as in the three papers): the
config's ``sparsity.distribution`` default (``erk``) is replaced by ``global`` for these methods unless the config
sets one explicitly.

Where the scores are computed: at ZeRO 0/1/2 each rank holds the whole (lp) parameters, so each rank scores whole
tensors with torch autograd on its own batches (``sparsity.init_batches`` of them, the first training batches of
its data stream), gradients averaged over ranks with one all-reduce in float64. At ZeRO-3 SNIP scores each rank's
own partition (:func:`partition_sensitivity`): every rank runs forward and backward of its batches through the
engine, so DeepSpeed gathers each module's parameters for its forward and backward and reduce-scatters (averages)
the gradients into each rank's fp32 partition, accumulating over the batches; the score is |g ⊙ w| of the partition,
w its initial master weights. No optimizer step is taken, and the engine clears every gradient it accumulated
before training starts. Either way the scores are :class:`RangeScores` (a range of the flattened parameter: the
whole tensor at ZeRO 0-2, the rank's partition at ZeRO-3) and the masks are selected through the exact selector,
each rank reading its slice at its offset. The two differ only in the order the gradient is summed (DeepSpeed's
fp32 reduce-scatter and accumulation against float64 sums), so scores agree to a few fp32 roundings of the summed
gradients' magnitude and masks agree except where a score lies that close to the selection threshold.

GraSP and SynFlow are refused at ZeRO-3 (``zero3_refusal``, a ConfigError on ``sparsity.method``): their scores
are not functions of a partition's gradient. GraSP's Hessian-gradient product differentiates the whole first
backward again (``create_graph``), and ZeRO-3 has released each module's gathered parameters when its backward
ended, so the second backward finds empty tensors; SynFlow replaces every parameter by a float64 |θ| copy and runs
the whole network on it, while ZeRO-3 holds a parameter whole only inside its own module's hooks and gathers only
DeepSpeed's partitioned parameters. Gathering the whole model on every rank for the scoring would work, but only for
a model that fits on one rank, and that model can be scored at ZeRO-2: the masks it saves start the ZeRO-3 run
(``sparsity.method: static`` with ``sparsity.init_masks``, docs/methods.md).
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dist_sparse import distributed as D
from dist_sparse.methods.base import SparseMethod


@dataclass(frozen=True)
class RangeScores:
    """Scores of the flattened range ``[start, start + values.numel())`` of one parameter: the whole tensor
    (``start`` 0) where a rank scores whole parameters (ZeRO 0-2), the rank's partition at ZeRO-3."""

    start: int
    values: torch.Tensor

    @classmethod
    def whole(cls, scores: torch.Tensor) -> "RangeScores":
        return cls(0, scores.reshape(-1))

    def read(self, name: str, start: int, length: int) -> torch.Tensor:
        """The scores of ``[start, start + length)``, which must lie inside this range."""
        lo = start - self.start
        if lo < 0 or lo + length > self.values.numel():
            raise RuntimeError(f"the scores of {name!r} cover [{self.start}, +{self.values.numel()}), not the "
                               f"range [{start}, +{length}) this rank selects")
        return self.values[lo: lo + length]


def slice_scores(scores: dict, slices: list) -> list:
    """Each slice's scores from ``scores`` (name -> :class:`RangeScores`), on the slice's device."""
    return [scores[s.name].read(s.name, s.start, s.mask.numel()).to(s.mask.device) for s in slices]


class PruningAtInit(SparseMethod):
    """Masks from ``init_scores`` (name -> :class:`RangeScores`, set before ``initial_masks``).

    ``zero3_refusal``: why the method cannot score at ZeRO-3 (None: it scores the partitions there, with
    :meth:`score_partitions`; a subclass that does not define that is refused)."""

    updates_masks = False
    needs_init_scores = True
    zero3_refusal: str | None = "it does not score ZeRO-3 partitions (it defines no score_partitions)"

    def __init__(self, *args, init_batches: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_batches = init_batches
        self.init_scores: dict | None = None

    def score(self, model: nn.Module, names: list, batches: list) -> dict:
        """Scores of the whole parameters ``names`` of ``model`` (every rank: its own ``batches``)."""
        raise NotImplementedError

    def score_partitions(self, backward, views: list, model: nn.Module, batches: list) -> dict:
        """ZeRO-3: :class:`RangeScores` of each view's partition (see :func:`partition_sensitivity`)."""
        raise NotImplementedError(f"{self.name} {self.zero3_refusal}")

    def initial_masks(self, slices, select):
        if self.init_scores is None:
            raise RuntimeError(f"{self.name}: the initial scores were not computed (attach() computes them)")
        scores = slice_scores(self.init_scores, slices)
        return self.select(slices, scores, [None] * len(slices), self.target_keep(slices, self.densities), select)


def zero3_refusal_message(cls) -> str | None:
    """The ConfigError message for pruning-at-initialization method ``cls`` at ZeRO stage 3 (None: it works)."""
    why = getattr(cls, "zero3_refusal", None)
    if why is None:
        return None
    return (f"{cls.name!r} cannot score at ZeRO stage 3: {why}. Score at ZeRO stage 2 (or 1, 0) and start the "
            "ZeRO-3 run from the masks it saved: sparsity.method: static, sparsity.init_masks: "
            "<output_dir>/final (docs/methods.md)")


def _params(model: nn.Module, names: list) -> list:
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def _mean_over_ranks(tensors: list, count: int) -> list:
    """Sum over ranks of per-rank sums, divided by the total ``count`` (batches on all ranks): the mean."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    D.all_reduce_sum(flat)
    flat /= count * D.world_size()
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos: pos + t.numel()].reshape(t.shape))
        pos += t.numel()
    return out


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()  # no dropout: scores are a function of the weights and the batches only
    try:
        yield
    finally:
        model.train(was)


def _loss(model, x):
    return model(input_ids=x, labels=x).loss


def connection_sensitivity(model: nn.Module, names: list, batches: list) -> dict:
    """SNIP's |g ⊙ w| of the whole parameters ``names``, g averaged over ``batches`` and over ranks (also the
    ``saliency`` of ``freeze.select``)."""
    params = _params(model, names)
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with _eval_mode(model):
        for x in batches:
            for s, g in zip(sums, torch.autograd.grad(_loss(model, x), params)):
                s += g.double()
    grads = _mean_over_ranks(sums, len(batches))
    return {n: (g * p.detach().double()).abs().float() for n, g, p in zip(names, grads, params)}


def partition_sensitivity(backward, views: list, model: nn.Module, batches: list) -> dict:
    """SNIP's |g ⊙ w| of each view's partition (ZeRO-3), as :class:`RangeScores` at the view's ``mask_start``.

    ``backward(x)`` runs one batch's forward and backward through the engine without a step: DeepSpeed averages the
    gradient over ranks into each rank's fp32 partition and accumulates it over the batches, so g is the views'
    gradient over ``len(batches)``, the mean over every rank's batches (each rank must pass as many); w is the
    partition's master weights (at initialisation the lp weights the forward ran on, in fp32)."""
    with _eval_mode(model):
        for x in batches:
            backward(x)
    out = {}
    for v in views:
        g = v.grad()
        if g is None:
            raise RuntimeError(f"{v.name}: no reduced gradient after the scoring backward")
        score = (g.double() / len(batches) * v.master().double()).abs().float()
        out[v.name] = RangeScores(v.mask_start, score.to("cpu"))
    return out


class SNIP(PruningAtInit):
    name = "snip"
    zero3_refusal = None  # |g ⊙ w| is elementwise: each partition's score needs only its own reduced gradient

    def score(self, model, names, batches):
        return connection_sensitivity(model, names, batches)

    def score_partitions(self, backward, views, model, batches):
        return partition_sensitivity(backward, views, model, batches)


class GraSP(PruningAtInit):
    name = "grasp"
    signed_scores = True  # a block pattern sums them instead of taking a norm
    zero3_refusal = ("its Hessian-gradient product differentiates the whole first backward again (double "
                     "backward, create_graph), and ZeRO-3 releases each module's gathered parameters when that "
                     "module's backward ends, so the second backward finds them empty; the score is not a function "
                     "of a partition's gradient")

    def score(self, model, names, batches):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        params = _params(model, names)
        # the math kernel of scaled-dot-product attention: the fused CPU/GPU kernels have no double backward
        with _eval_mode(model), sdpa_kernel(SDPBackend.MATH):
            sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            for x in batches:
                for s, g in zip(sums, torch.autograd.grad(_loss(model, x), params)):
                    s += g.double()
            g_const = [g.to(p.dtype) for g, p in zip(_mean_over_ranks(sums, len(batches)), params)]
            hg_sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            for x in batches:
                grads = torch.autograd.grad(_loss(model, x), params, create_graph=True)
                z = sum((g * c).sum() for g, c in zip(grads, g_const))
                for s, hg in zip(hg_sums, torch.autograd.grad(z, params)):
                    s += hg.double()
        hg = _mean_over_ranks(hg_sums, len(batches))
        # the paper's S = -w ⊙ Hg, highest removed: the selector keeps the highest of -S
        return {n: (p.detach().double() * h).float() for n, h, p in zip(names, hg, params)}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


@contextlib.contextmanager
def _affine_norms(model: nn.Module):
    """Every norm evaluated as x * weight (+ bias): the all-ones input has zero variance (see the docstring)."""
    patched = []
    for m in model.modules():
        if _is_norm(m) and getattr(m, "weight", None) is not None:
            def affine(x, m=m):
                out = x * m.weight
                return out + m.bias if getattr(m, "bias", None) is not None else out
            m.forward = affine
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class SynFlow(PruningAtInit):
    name = "synflow"
    zero3_refusal = ("it runs the whole network with every parameter replaced by a float64 |θ| copy, and ZeRO-3 "
                     "holds a parameter whole only inside its own module's forward and backward hooks, which gather "
                     "DeepSpeed's partitioned parameters, not replacements; the score is not a function of a "
                     "partition")

    def __init__(self, *args, init_rounds: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_rounds = init_rounds

    def synflow_scores(self, model, names, masks: dict) -> dict:
        """One round: θ ⊙ dR/dθ of the network with |θ| (masked), in float64, from the all-ones embedding."""
        from torch.func import functional_call

        named = dict(model.named_parameters())
        values = {n: p.detach().double().abs() for n, p in named.items()}
        for n in names:
            values[n] = (values[n] * masks[n]).requires_grad_(True)
        buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
        emb = model.get_input_embeddings()
        length = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1)
        ones = torch.ones(1, min(int(length), 64), emb.weight.shape[1], dtype=torch.float64,
                          device=emb.weight.device)
        with _eval_mode(model), _affine_norms(model):
            out = functional_call(model, {**values, **buffers}, args=(), kwargs={"inputs_embeds": ones})
            r = out.logits.sum()
            grads = torch.autograd.grad(r, [values[n] for n in names])
        return {n: (g * values[n].detach()).float() for n, g in zip(names, grads)}

    def score(self, model, names, batches):
        from dist_sparse.masks.select import LocalSelector
        from dist_sparse.methods.base import LayerSlice

        # data-free: every rank computes the same scores; the rounds' selections run in-process on whole tensors
        masks = {n: torch.ones_like(p, dtype=torch.float64) for n, p in zip(names, _params(model, names))}
        shapes = {n: tuple(p.shape) for n, p in zip(names, _params(model, names))}
        final = self.densities
        scores = None
        for k in range(1, self.init_rounds + 1):
            scores = self.synflow_scores(model, names, masks)
            if k == self.init_rounds:
                break
            # the exponential schedule: density d^(k/n) after round k
            densities = {n: final[n] ** (k / self.init_rounds) for n in names}
            slices = [LayerSlice(n, i, shapes[n], scores[n].numel(), 0, masks[n].reshape(-1) > 0, None, None)
                      for i, n in enumerate(names)]
            kept = self.select(slices, [scores[n].reshape(-1) for n in names], [sl.mask for sl in slices],
                               self.target_keep(slices, densities), LocalSelector())
            masks = {n: m.reshape(shapes[n]).double() for n, m in zip(names, kept)}
        # the last round's scores; pruned positions score below every kept one (the final selection keeps them out)
        floor = min(float(scores[n].min()) for n in names) - 1.0
        return {n: torch.where(masks[n] > 0, scores[n], torch.full_like(scores[n], floor)) for n in names}
