"""Worker for tests/test_kernels_training.py (run under torchrun, CPU, gloo, 2 ranks).

For ZeRO-1, 2 and 3: 20 steps of RigL with ``block:16x16`` masks on a small GPT-2 (Conv1D layers), once with
``sparsity.kernel: dense`` and once with ``block_sparse`` (at ZeRO-2 once more with gradient checkpointing, at
ZeRO-3 once more with compact state and packed shards, at ZeRO-1 and 2 once more with compact state: the weights held
as their active values between steps),
same data and seeds. Per run and rank it records every loss, the full masks at the end, the pruned model weights'
nonzero count after every step, the reduced gradient this rank holds on every dense-gradient step (RigL's growth
score, including pruned positions), and the layer kernels. Rank 0 writes the JSON report to argv[1].
"""

import gc
import sys

import deepspeed
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import GPT2Config, GPT2LMHeadModel

import dist_sparse
from dist_sparse.integration import kernels as kernels_mod
from dist_sparse.integration import packed_weights as packed_weights_mod
from tests.workers import finish, train_steps

STEPS = 20


def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def run(stage: int, kernel: str, checkpointing: bool = False, compact: bool = False) -> dict:
    m = model()
    if checkpointing:
        m.gradient_checkpointing_enable()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "torch_adam": True}},
        # packed shards store a shard as its active values; parameters under the persistence threshold stay
        # whole (DeepSpeed keeps them gathered), and every parameter of this model is under the default 1e5
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if compact else {})},
        "gradient_clipping": 1.0,
        "sparsity": {"method": "rigl", "sparsity": 0.75, "distribution": "uniform", "pattern": "block:16x16",
                     "grow_grad_steps": 1,  # explicit: the default differs with compact state, compression, kernels
                     "kernel": kernel, "update_interval": 5, "start_step": 0, "end_step": 16,
                     "drop_fraction": 0.3, "compact_state": compact, "packed_gather": compact and stage == 3},
    }
    # weak references to the storages of DeepSpeed's flat buffers when the held weights replace them: a storage
    # expires only when no tensor, view or storage object (Python or C++) holds it, and a freed address that the
    # allocator hands out again to another tensor does not count as alive
    dense_flats = []
    original_init = packed_weights_mod.PackedWeights.__init__

    def recording_init(self, store, layers):
        dense_flats.extend(StorageWeakRef(t.untyped_storage()) for t in store.zo.bit16_groups_flat)
        original_init(self, store, layers)

    packed_weights_mod.PackedWeights.__init__ = recording_init
    engine, _, _, _ = dist_sparse.initialize(model=m, config=config, total_steps=STEPS, seed=3)
    packed_weights_mod.PackedWeights.__init__ = original_init
    calls = [0]  # forwards through the operator: the replaced forward really ran (at ZeRO-3 too)
    operator = kernels_mod.block_sparse_linear

    def counting(*args, **kwargs):
        calls[0] += 1
        return operator(*args, **kwargs)

    kernels_mod.block_sparse_linear = counting
    sp = engine.sparsifier
    rank = torch.distributed.get_rank()
    report = {"losses": [], "masked_nonzero": [], "dense_grads": [], "layer_kernel": engine.layer_kernel()}
    original_update = sp._update

    def recording_update(step):
        # the reduced gradient of this rank's range at the update: RigL grows by its values at pruned positions
        report["dense_grads"].append([v.grad().float().reshape(-1).tolist() for v in sp.views])
        original_update(step)

    sp._update = recording_update
    names = [v.name for v in sp.views]
    params = dict(engine.module.named_parameters())

    def weights() -> dict:
        if stage < 3:  # through the state dict: held weights (compact state) are materialised there
            state = engine.module.state_dict()
            return {n: state[n] for n in names}
        with deepspeed.zero.GatheredParameters([params[n] for n in names]):  # the whole weights, not the shards
            return {n: params[n].detach().clone() for n in names}

    for loss in train_steps(engine, STEPS, 64, (2, 32), 100 + rank):
        report["losses"].append(loss)
        masks, w = sp.full_masks(), weights()
        report["masked_nonzero"].append(sum(int((w[n][~masks[n]] != 0).sum()) for n in names))
    report["masks"] = {n: mk.reshape(-1).int().tolist() for n, mk in sp.full_masks().items()}
    report["updates"] = sp.updates_done
    report["kernels_state"] = engine.kernels.state_dict() if engine.kernels is not None else None
    report["operator_calls"] = calls[0]
    report["state_bytes"] = dict(engine.state_bytes or {})
    held = getattr(engine.compact, "packed_weights", None) if stage < 3 else None
    if held is not None:
        report["held"] = sorted(held.held)
        # a module load round trip: the held weights take the loaded values and give them back the same
        before = {n: t.clone() for n, t in engine.module.state_dict().items()}
        engine.module.load_state_dict(before)
        after = engine.module.state_dict()
        report["load_round_trip"] = all(torch.equal(before[n], after[n]) for n in before)
        report["held_placeholders"] = all(params[n].data.untyped_storage().nbytes() <= 4 for n in held.held)
        # DeepSpeed's dense flat buffers are gone, not only uncounted: nothing holds their storage any more
        gc.collect()
        report["dense_buffer_alive"] = not dense_flats or not all(ref.expired() for ref in dense_flats)
    kernels_mod.block_sparse_linear = operator
    return report


def main():
    out = sys.argv[1]
    results = {}
    for stage in (1, 2, 3):
        results[f"{stage}/dense"] = run(stage, "dense")
        results[f"{stage}/block_sparse"] = run(stage, "block_sparse")
    results["3/block_sparse/compact"] = run(3, "block_sparse", compact=True)
    results["2/block_sparse/compact"] = run(2, "block_sparse", compact=True)
    results["1/block_sparse/compact"] = run(1, "block_sparse", compact=True)
    results["2/block_sparse/checkpointing"] = run(2, "block_sparse", checkpointing=True)
    finish(results, out)


if __name__ == "__main__":
    main()
