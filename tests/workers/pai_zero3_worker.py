"""Worker for tests/test_pai.py's ZeRO-3 test (torchrun, 2 CPU ranks, gloo): SNIP scored on ZeRO-3 partitions.

The tiny GPT-2 (fp32) at ZeRO-3, SNIP 80% with global selection, 2 scoring batches per rank (different on each
rank). Every rank checks against the ZeRO 0-2 scorer (``connection_sensitivity``: whole tensors, torch autograd,
float64 sums, one all-reduce) run on a plain copy of the model with the same batches:

- scores: each rank's partition scores against its range of the reference, within the bound below;
- masks: the ZeRO-3 masks (exact distributed selector on the partitions) against the reference's selection
  (``initial_masks`` on whole tensors, one process), equal outside the band of scores within the bound of the
  threshold (and the band's size is reported: normally no score lies in it and the masks are equal);
- no trace of the scoring in training: the first training step after scoring (loss, every parameter's reduced
  gradient, the master weights after the step) equals, bit for bit, that of an engine given the same masks through
  ``init_masks`` that never scored;
- ``freeze.select: saliency`` at ZeRO-3: the frozen positions against the reference selection (the lowest
  saliency of the masked model, per layer), the same way as the masks.

Rank 0 writes the JSON report to argv[1].
"""

import sys

import deepspeed
import torch

from dist_sparse import distributed as D
from dist_sparse.config import from_dict
from dist_sparse.integration.deepspeed import import_deepspeed, init_distributed
from dist_sparse.integration.engine import attach
from dist_sparse.masks.select import LocalSelector, topk_reference
from dist_sparse.methods import LayerSlice
from dist_sparse.methods.pai import RangeScores, connection_sensitivity
from tests.workers import finish, tiny_gpt2

DS = {"train_micro_batch_size_per_gpu": 2,
      "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1, "torch_adam": True}},
      "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}
BATCHES = 2
FREEZE = 0.5
# The bound on |ZeRO-3 score - reference score| at one position, in units of A·|w| (A: the mean over every rank's
# batches of |g| there, w the weight). Both paths take the same per-batch gradients (the same weights, batches and
# kernels); they differ in how the mean over the 2 ranks x 2 batches is summed: the reference in float64, DeepSpeed
# in fp32 (one reduce-scatter sum per batch, then the accumulation over batches), and each of those 3 roundings
# errs by at most 2^-24 of a partial sum of |g|, which is at most 4·A; with the score's own rounding to fp32 that
# is below 13·2^-24·A·|w|. 2^-20 = 16·2^-24 covers it (a reduction in another order rounds the same number of
# times).
BOUND = 2.0 ** -20


def batches_of(rank: int) -> list:
    g = torch.Generator().manual_seed(50 + rank)  # each rank scores its own batches
    return [torch.randint(0, 48, (2, 16), generator=g) for _ in range(BATCHES)]


def engine_for(extra: dict, init_batches=None, init_masks=None):
    cfg = from_dict({"deepspeed": DS, **extra})  # the config check accepts snip at ZeRO-3
    model = tiny_gpt2()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS)
    return attach(engine, model, cfg.sparsity, total_steps=4, seed=3, init_batches=init_batches,
                  init_masks=init_masks, freeze=cfg.freeze)


def reference(names: list, batches: list, masks: dict | None = None):
    """The ZeRO 0-2 scorer's scores of a plain copy (its weights masked by ``masks``), the magnitude A·|w| the
    bound is relative to, and the weights."""
    model = tiny_gpt2()
    params = dict(model.named_parameters())
    if masks is not None:
        with torch.no_grad():
            for n in names:
                params[n].mul_(masks[n].reshape(params[n].shape))
    scores = connection_sensitivity(model, names, batches)
    model.eval()
    sums = torch.cat([torch.zeros(params[n].numel(), dtype=torch.float64) for n in names])
    for x in batches:
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, [params[n] for n in names])
        sums += torch.cat([g.reshape(-1).double().abs() for g in grads])
    D.all_reduce_sum(sums)
    sums /= len(batches) * D.world_size()
    scale, pos = {}, 0
    for n in names:
        w = params[n].detach().reshape(-1).double()
        scale[n] = sums[pos: pos + w.numel()] * w.abs()
        pos += w.numel()
    return scores, scale


def compare_scores(engine, ref: dict, scale: dict) -> dict:
    """This rank's partition scores against its range of the reference: the largest difference in units of A·|w|."""
    worst, covered = 0.0, 0
    for name, part in engine.sparsifier.method.init_scores.items():
        lo, n = part.start, part.values.numel()
        diff = (part.values.double() - ref[name].reshape(-1)[lo: lo + n].double()).abs()
        rel = diff / scale[name][lo: lo + n].clamp_min(1e-300)
        worst = max(worst, float(rel.max()) if n else 0.0)
        covered += n
    return {"worst": worst, "covered": covered, "total": sum(v.numel for v in engine.sparsifier.views)}


def compare_selection(ours: dict, theirs: dict, ref: dict, scale: dict, thresholds: dict) -> dict:
    """Selections (name -> full bool) against the reference's: differences outside the band of scores within the
    bound of their threshold, the band's size, and whether they are equal everywhere."""
    outside, band, equal = 0, 0, True
    for name, mine in ours.items():
        r, s = ref[name].reshape(-1).double(), scale[name]
        near = (r - thresholds[name]).abs() <= BOUND * s
        differ = mine.reshape(-1) != theirs[name].reshape(-1)
        outside += int((differ & ~near).sum())
        band += int(near.sum())
        equal &= not bool(differ.any())
    return {"outside_band": outside, "band": band, "equal": equal}


def first_step(engine, rank: int) -> dict:
    """One training step: the loss, every parameter's reduced gradient (this rank's range) and the masters."""
    torch.manual_seed(7)  # dropout: both engines draw the same
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 48, (2, 16), generator=g)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    grads = {v.name: v.grad().clone() for v in engine.param_views}
    engine.step()
    return {"loss": loss.detach().clone(), "grads": grads,
            "masters": {v.name: v.master().clone() for v in engine.param_views}}


def main():
    import_deepspeed()
    init_distributed()
    rank = D.rank()
    batches = batches_of(rank)
    sparsity = {"method": "snip", "sparsity": 0.8, "init_batches": BATCHES}
    report = {}

    # SNIP on the partitions
    scored = engine_for({"sparsity": sparsity}, init_batches=batches)
    sp = scored.sparsifier
    names = [v.name for v in sp.views]
    ref, scale = reference(names, batches)
    report["scores"] = compare_scores(scored, ref, scale)
    masks = sp.full_masks()
    zero3_scores = sp.method.init_scores
    sp.method.init_scores = {n: RangeScores.whole(ref[n]) for n in names}
    full = [LayerSlice(v.name, sp.order[v.name], v.shape, v.numel, 0, torch.ones(v.numel, dtype=torch.bool), None,
                       None) for v in sp.views]
    ref_masks = dict(zip(names, sp.method.initial_masks(full, LocalSelector())))
    sp.method.init_scores = zero3_scores
    threshold = min(float(ref[n].reshape(-1)[ref_masks[n]].min()) for n in names)  # global selection
    report["masks"] = compare_selection(masks, ref_masks, ref, scale, dict.fromkeys(names, threshold))
    report["masks"]["kept"] = [sum(int(m.sum()) for m in masks.values()),
                               sum(int(m.sum()) for m in ref_masks.values())]

    # the first training step equals that of an engine that never scored
    after_scoring = first_step(scored, rank)
    given = engine_for({"sparsity": sparsity}, init_masks=masks)
    report["given_masks_equal"] = all(torch.equal(given.sparsifier.full_mask(n), masks[n]) for n in names)
    given_step = first_step(given, rank)
    report["first_step"] = {
        "loss": bool(torch.equal(after_scoring["loss"], given_step["loss"])),
        "grads": all(torch.equal(after_scoring["grads"][n], given_step["grads"][n]) for n in after_scoring["grads"]),
        "masters": all(torch.equal(after_scoring["masters"][n], given_step["masters"][n])
                       for n in after_scoring["masters"]),
        "grad_params": len(after_scoring["grads"]),
    }

    # freeze.select: saliency on the partitions (of the masked weights, after the masks are applied)
    frozen_engine = engine_for({"sparsity": sparsity, "freeze": {"fraction": FREEZE, "select": "saliency"}},
                               init_batches=batches)
    fsp = frozen_engine.sparsifier
    fmasks = fsp.full_masks()
    frozen = {n: fsp.gather(n, fsp.frozen_mask(n)) for n in names}
    sal, sal_scale = reference(names, batches, fmasks)
    ref_frozen, thresholds = {}, {}
    for n in names:
        active = fmasks[n].reshape(-1)
        a = int(active.sum())
        trained = topk_reference(sal[n].reshape(-1), active, a - int(round(FREEZE * a)))
        ref_frozen[n] = active & ~trained
        thresholds[n] = float(sal[n].reshape(-1)[trained].min())
    report["freeze"] = compare_selection(frozen, ref_frozen, sal, sal_scale, thresholds)
    report["freeze"]["frozen"] = [sum(int(f.sum()) for f in frozen.values()),
                                  sum(int(f.sum()) for f in ref_frozen.values())]
    report["freeze"]["masks_equal_snip"] = all(torch.equal(fmasks[n], masks[n]) for n in names)
    finish(report, sys.argv[1])


if __name__ == "__main__":
    main()
