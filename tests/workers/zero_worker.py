"""Worker for tests/test_deepspeed_zero.py (run under torchrun, CPU, gloo).

For each ZeRO stage (argv[1]) and each of its methods (argv[3]): trains a tiny GPT-2 through
``dist_sparse.initialize`` for a few steps and checks, on every rank:
- the initial masks and every updated mask equal, bit for bit, what one process computes from the gathered full
  weights and dense gradients (LocalSelector: stable sort, no collectives);
- after every optimizer step the model's pruned weights are exactly 0, and so are the fp32 master weights;
- losses are finite; the achieved sparsity equals the target.
Rank 0 writes a JSON report to argv[2].
"""

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

import dist_sparse
from dist_sparse.masks.select import LocalSelector
from dist_sparse.methods import LayerSlice
from tests.workers import finish, tiny_gpt2, train_steps

STEPS = 9


def full_model_weights(engine, names):
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([params[n] for n in names], enabled=engine.zero_optimization_stage() == 3):
        return {n: params[n].detach().clone().float() for n in names}


def run(stage: int, spec: str) -> dict:
    """``spec`` is a method, or ``method@pattern`` (``rigl@2:4``, ``set@block:4x4``)."""
    method, _, pattern = spec.partition("@")
    pattern = pattern or "unstructured"
    model = tiny_gpt2()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "sparsity": {"method": method, "distribution": "erk", "update_interval": 2, "pattern": pattern,
                     "grow_grad_steps": 1,  # explicit: the default differs with compact state, compression, kernels
                     "start_step": 0, "end_step": 8, "drop_fraction": 0.5},
    }
    if ":" not in pattern or pattern.startswith("block"):  # N:M fixes the sparsity itself
        config["sparsity"]["sparsity"] = 0.8
    init_batches = None
    if method in ("snip", "grasp", "synflow"):  # pruning at init: global selection (their default), few rounds
        del config["sparsity"]["distribution"]
        config["sparsity"].update(init_batches=2, init_rounds=5)
        g = torch.Generator().manual_seed(50 + torch.distributed.get_rank())  # each rank scores its own batches
        init_batches = [torch.randint(0, 48, (2, 16), generator=g) for _ in range(2)]
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3,
                                             init_batches=init_batches)
    sp = engine.sparsifier
    rank = torch.distributed.get_rank()
    report = {"reference_equal": [], "masked_nonzero": [], "master_masked_nonzero": [], "losses": []}

    def full_slices(masks, weights=None, grads=None):
        return [LayerSlice(v.name, sp.order[v.name], v.shape, v.numel, 0, masks[v.name].reshape(-1),
                           None if weights is None else weights[v.name].reshape(-1),
                           None if grads is None else grads[v.name].reshape(-1)) for v in sp.views]

    # initial masks vs the single-process reference
    init = sp.full_masks()
    if sp.method.dense_start:
        ref = [torch.ones(v.numel, dtype=torch.bool) for v in sp.views]
    else:  # weight-based initial masks (SR-STE's S(W)) score the masters, which such methods keep dense
        masters = {v.name: sp.gather(v.name, v.master().float().clone()) for v in sp.views}
        ref = sp.method.initial_masks(full_slices(init, masters), LocalSelector())
    report["reference_equal"].append(all(torch.equal(r, init[v.name].reshape(-1)) for v, r in zip(sp.views, ref)))

    original_update = sp._update

    params = dict(engine.module.named_parameters())

    def checked_update(step):
        weights = {v.name: sp.gather(v.name, v.master().float().clone()) for v in sp.views}
        grads = None
        if not sp.method.reselects_before_forward:  # SR-STE decides before the forward: no gradient yet
            grads = {v.name: sp.gather(v.name, v.grad().float().clone()) for v in sp.views}
            # the gradient a rank scores is its range of the true reduced gradient (DeepSpeed's own full-grad API)
            report.setdefault("grad_matches_deepspeed", []).append(all(
                torch.equal(grads[v.name].reshape(-1), safe_get_full_grad(params[v.name]).float().reshape(-1))
                for v in sp.views))
        old = sp.full_masks()
        original_update(step)
        new = sp.full_masks()
        ref = sp.method.update(step, full_slices(old, weights, grads), LocalSelector())
        report["reference_equal"].append(all(torch.equal(r, new[v.name].reshape(-1)) for v, r in zip(sp.views, ref)))

    sp._update = checked_update
    names = [v.name for v in sp.views]
    for loss in train_steps(engine, STEPS, 48, (2, 16), 100 + rank):
        report["losses"].append(loss)
        masks = sp.full_masks()
        weights = full_model_weights(engine, names)
        report["masked_nonzero"].append(sum(int((weights[n][~masks[n]] != 0).sum()) for n in names))
        report["master_masked_nonzero"].append(
            sum(int((v.master()[~sp.mask(v.name).to(v.master().device)] != 0).sum()) for v in sp.views))
    # the whole masks have the pattern's structure (GPT-2's Conv1D: groups along the stored rows, its input)
    transposed = sp.method.pattern.transposed
    report["conforms"] = all(sp.method.pattern.conforms(sp.full_mask(v.name).reshape(v.shape), v.name in transposed)
                             for v in sp.views)
    report["updates"] = sp.updates_done
    report["achieved_sparsity"] = sp.achieved_sparsity()
    report["mask_bytes"] = sp.mask_bytes()
    report["owned"] = sum(v.mask_len for v in sp.views)
    report["total"] = sp.sparsified_numel()
    return report


def main():
    """argv: comma-separated ZeRO stages, report path, then a JSON object stage -> comma-separated method specs (one
    process group runs every stage: start-up dominates). The report: per rank, stage -> spec -> results."""
    stages, out, methods = [int(x) for x in sys.argv[1].split(",")], sys.argv[2], json.loads(sys.argv[3])
    finish({str(stage): {m: run(stage, m) for m in methods[str(stage)].split(",")} for stage in stages}, out)


if __name__ == "__main__":
    main()
