"""Worker for tests/test_hf_architectures.py (torchrun, CPU, gloo, 2 ranks): every architecture of
tests/hf_architectures.py, one after the other in this one launch, at each ZeRO stage of argv[1].

Per architecture, built from its config.json through ``model.config`` (``build_causal_lm``), RigL at 80% (ERK):
- the default choice of sparsified parameters (reported, checked by the test);
- masks sharded: each rank stores only its partition's bits;
- exact selection: the initial masks and every update equal what one process computes on the gathered full
  weights and dense gradients (LocalSelector); for fused experts, every expert keeps exactly its own layer's
  number of weights (one density per expert, not one top-k over the stack);
- pruned weights exactly 0 after every step, in the model and in the fp32 master weights;
- argv[3]: ``compact`` (``sparsity.compact_state: true``), ``dense`` or ``alternate`` (see :func:`compact_for`);
- the exported ``final/`` (``trainer.save_final``) loads with ``from_pretrained``: pruned weights 0, masks equal,
  weights equal the engine's, tied embeddings still tied.
"""

import sys
import types
from pathlib import Path

import deepspeed
import torch

from dist_sparse import distributed as D
from dist_sparse.checkpointing import save_final
from dist_sparse.config import ModelConfig, split_deepspeed_json
from dist_sparse.data import Tokenizer
from dist_sparse.distributions import keep_counts, layer_densities
from dist_sparse.integration import hf
from dist_sparse.integration.deepspeed import init_distributed
from dist_sparse.integration.engine import attach
from dist_sparse.integration.experts import register_zero3_leaves
from dist_sparse.masks.io import load_masks
from dist_sparse.masks.select import LocalSelector
from dist_sparse.methods import LayerSlice
from tests.hf_architectures import ARCHITECTURES, POSITIONS, VOCAB, write_config
from tests.workers import finish

STEPS = 5


def gathered(engine, names):
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([params[n] for n in names], enabled=engine.zero_optimization_stage() == 3):
        return {n: params[n].detach().clone().float() for n in names}


def expert_counts(masks, sparsity: float) -> dict:
    """name[e] -> (active weights, the expert's own target count) for stacked (3-D) parameters; the targets are
    ERK's over the per-expert matrices, computed here from the shapes (independently of the method)."""
    shapes = {}
    for name, mask in masks.items():
        if mask.dim() == 3:
            shapes.update({f"{name}[{e}]": tuple(mask.shape[1:]) for e in range(mask.shape[0])})
        else:
            shapes[name] = tuple(mask.shape)
    density = layer_densities(shapes, sparsity, "erk")
    out = {}
    for name, mask in masks.items():
        if mask.dim() == 3:
            for e in range(mask.shape[0]):
                layer = f"{name}[{e}]"
                want = keep_counts({layer: mask[e].numel()}, {layer: density[layer]})[layer]
                out[layer] = (int(mask[e].sum()), want)
    return out


def run(arch: str, stage: int, compact: bool, work: Path) -> dict:
    cfg_path = write_config(work / arch, arch)
    model_cfg = ModelConfig(config=str(cfg_path), block_size=16)
    torch.manual_seed(0)
    model = hf.build_causal_lm(model_cfg, VOCAB)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if stage == 3:
        register_zero3_leaves(model)
    ds, sparsity, _ = split_deepspeed_json({
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "sparsity": {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 2,
                     "end_step": STEPS, "drop_fraction": 0.5, "compact_state": compact,
                     "grow_grad_steps": 1}})  # the reference scores the update step's gradient (the paper's)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    engine = attach(engine, model, sparsity, total_steps=STEPS, seed=1)
    sp = engine.sparsifier
    r = {"names": [v.name for v in sp.views], "tied": tied, "reference_equal": [], "masked_nonzero": [],
         "master_masked_nonzero": [], "losses": [], "compact": engine.compact is not None}

    def full_slices(masks, weights=None, grads=None):
        return [LayerSlice(v.name, sp.order[v.name], v.shape, v.numel, 0, masks[v.name].reshape(-1),
                           None if weights is None else weights[v.name].reshape(-1),
                           None if grads is None else grads[v.name].reshape(-1)) for v in sp.views]

    def equal(ref, masks):
        return all(torch.equal(a, masks[v.name].reshape(-1)) for v, a in zip(sp.views, ref))

    init = sp.full_masks()
    r["reference_equal"].append(equal(sp.method.initial_masks(full_slices(init), LocalSelector()), init))
    r["expert_counts_initial"] = expert_counts(init, 0.8)
    original = sp._update

    def checked_update(step):
        weights = {v.name: sp.gather(v.name, v.master().float().clone()) for v in sp.views}
        grads = {v.name: sp.gather(v.name, v.grad().float().clone()) for v in sp.views}
        old = sp.full_masks()
        original(step)
        new = sp.full_masks()
        r["reference_equal"].append(equal(sp.method.update(step, full_slices(old, weights, grads), LocalSelector()),
                                          new))

    sp._update = checked_update
    names = [v.name for v in sp.views]
    g = torch.Generator().manual_seed(100 + D.rank())
    for _ in range(STEPS):
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        r["losses"].append(float(loss))
        masks = sp.full_masks()
        w = gathered(engine, names)
        r["masked_nonzero"].append(sum(int((w[n][~masks[n]] != 0).sum()) for n in names))
        r["master_masked_nonzero"].append(
            sum(int((v.master()[~sp.mask(v.name).to(v.master().device)] != 0).sum()) for v in sp.views))
    masks = sp.full_masks()
    r["expert_counts_final"] = expert_counts(masks, 0.8)
    r["updates"] = sp.updates_done
    r["owned"] = sum(v.mask_len for v in sp.views)
    r["total"] = sp.sparsified_numel()
    r["mask_bytes"] = sp.mask_bytes()
    r["achieved_sparsity"] = sp.achieved_sparsity()

    # the exported final/ (what dist-sparse train writes): reloaded on rank 0
    final = work / f"{arch}_final"
    weights = gathered(engine, [n for n, _ in engine.module.named_parameters()])
    save_final(engine, model, sp, types.SimpleNamespace(tokenizer=Tokenizer.for_text("char", "abc")), final)
    D.barrier()
    if D.rank() == 0:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(final)
        params = dict(loaded.named_parameters())
        saved_masks = load_masks(final)
        r["final_masks_equal"] = set(saved_masks) == set(masks) and all(
            torch.equal(saved_masks[n], masks[n]) for n in masks)
        r["final_pruned_nonzero"] = sum(int((params[n].detach()[~masks[n]] != 0).sum()) for n in masks)
        r["final_weights_equal"] = all(torch.equal(params[n].detach().float(), weights[n]) for n in params)
        r["final_tied"] = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        r["final_max_positions"] = loaded.config.max_position_embeddings == POSITIONS
    return r


def compact_for(mode: str, stage: int, index: int) -> bool:
    """``compact``/``dense``: every architecture; ``alternate``: every other one (even ones at ZeRO-2, odd ones at
    ZeRO-3), so the two stages run each architecture once with and once without compact state."""
    if mode == "alternate":
        return (index + stage) % 2 == 0
    return mode == "compact"


def main():
    """argv: comma-separated ZeRO stages (one launch runs them all: start-up dominates), report path, mode, work
    directory, optionally comma-separated architectures. The report: per rank, stage -> architecture -> results."""
    stages, out, mode, work = [int(x) for x in sys.argv[1].split(",")], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    archs = sys.argv[5].split(",") if len(sys.argv) > 5 else list(ARCHITECTURES)
    init_distributed()
    finish({str(stage): {a: run(a, stage, compact_for(mode, stage, i), work / f"zero{stage}")
                         for i, a in enumerate(archs)} for stage in stages}, out)


if __name__ == "__main__":
    main()
