"""Worker for tests/test_packed_gather.py (torchrun, CPU, gloo, 2 ranks): ZeRO-3 parameter gathers, packed vs dense.

Trains the workers' tiny GPT-2 at ZeRO-3 with RigL 80% (mask updates at steps 0, 2 and 4) in pairs of runs from
the same seed and batches, ``sparsity.packed_gather`` off (DeepSpeed's dense gather) and on:
fp32 masked-dense with one micro-batch per step, and bf16 compact state with 2 accumulation micro-batches.
``stage3_param_persistence_threshold`` is 100, so the weight matrices (sparsified), the embeddings and the MLP's
input bias (not sparsified) are partitioned and gathered, often in the same coalesced call (DeepSpeed prefetches
after the first step), while the other biases and the norms are kept whole.

Every parameter's ``all_gather_coalesced`` (already ParamGather's) is wrapped once more here, to observe what the
coordinator gets: each call's parameter list and, after its handle's first ``wait``, every gathered tensor. For
each run, per optimizer step: the gathered (name, tensor) sequence, the bytes ParamGather counted, and the bytes
the formula gives for the observed calls from the masks (taken before each step's first forward; masks change only
inside ``engine.step``): a packed call hands sum(ceil(n / 8)) mask bytes + element size x the largest rank's
active count over its sparsified parameters, dense parameters their shard. Rank 0 writes a JSON report to argv[1].
"""

import sys

import torch

import dist_sparse
from dist_sparse.integration import patches
from dist_sparse.masks.packing import packed_nbytes
from tests.workers import finish, tiny_gpt2, tiny_rigl_config

STEPS = 8


def build(packed: bool, dtype: str, compact: bool, gas: int):
    config = tiny_rigl_config(3, gradient_accumulation_steps=gas)
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 100}
    config["sparsity"].update(packed_gather=packed, compact_state=compact)
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    model = tiny_gpt2()
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3)
    return engine


class Observer:
    """Records the coordinator's gathers (see the module docstring)."""

    def __init__(self, engine, packed: bool):
        self.names = {id(p): n for n, p in engine.module.named_parameters()}
        self.sparse = set(engine.sparsifier.order) if packed else set()
        self.world = torch.distributed.get_world_size()
        self.gathered, self.expected, self.calls = [], 0, 0
        self.active = {}  # name -> [active count of rank r's shard]
        for p in engine.module.parameters():
            if hasattr(p, "ds_tensor"):
                patches.replace(p, "all_gather_coalesced", self._wrap(p.all_gather_coalesced), by="test observer")

    def masks(self, full_masks: dict) -> None:
        self.active = {}
        for name, m in full_masks.items():
            flat = m.reshape(-1)
            n = -(-flat.numel() // self.world)
            self.active[name] = [int(flat[r * n: (r + 1) * n].sum()) for r in range(self.world)]

    def _bytes(self, params: list) -> int:
        dense, bits, counts = 0, 0, [0] * self.world
        for p in params:
            n, size = p.ds_tensor.ds_numel, p.ds_tensor.element_size()
            name = self.names[id(p)]
            if name in self.sparse:
                bits += packed_nbytes(n)
                counts = [c + a for c, a in zip(counts, self.active[name])]
            else:
                dense += n * size
        size = params[0].ds_tensor.element_size()
        return dense + (bits + size * max(counts) if bits else 0)

    def _wrap(self, inner):
        def all_gather_coalesced(params, safe_mode=False, quantize=False):
            params = list(params)
            handle = inner(params, safe_mode=safe_mode, quantize=quantize)
            self.calls += 1
            self.expected += self._bytes(params)
            observer = self

            class Observed:
                done = False

                def wait(self, handle_dependency=True):
                    handle.wait(handle_dependency=handle_dependency)
                    if not self.done:  # the coordinator waits once per parameter; all are gathered by now
                        self.done = True
                        for p in sorted(params, key=lambda q: q.ds_id):
                            observer.gathered.append((observer.names[id(p)], p.data.detach().clone()))

            return Observed()
        return all_gather_coalesced


def run(packed: bool, dtype: str, compact: bool, gas: int) -> tuple:
    engine = build(packed, dtype, compact, gas)
    sp, pg = engine.sparsifier, engine.param_gather
    obs = Observer(engine, packed)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    report = {"losses": [], "measured": [], "dense": [], "expected": [], "expected_dense": [], "updates": [],
              "pruned_nonzero": 0, "gathered_per_step": []}
    steps_gathered = []
    for _ in range(STEPS):
        masks = sp.full_masks()  # a collective, outside any gather
        obs.masks(masks)
        before = (pg.handed_bytes, pg.dense_bytes, obs.expected)
        obs.gathered = []
        dense_expected = 0
        for micro in range(gas):
            x = torch.randint(0, 48, (2, 16), generator=g)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            if micro == gas - 1:
                report["updates"].append(bool(sp.method.is_update_step(engine.global_steps)))
            engine.step()
            report["losses"].append(float(loss))
        for name, t in obs.gathered:
            dense_expected += -(-t.numel() // obs.world) * t.element_size()
            if name in masks:
                report["pruned_nonzero"] += int((t.reshape(-1)[~masks[name].reshape(-1)] != 0).sum())
        report["measured"].append(pg.handed_bytes - before[0])
        report["dense"].append(pg.dense_bytes - before[1])
        report["expected"].append(obs.expected - before[2])
        report["expected_dense"].append(dense_expected)
        report["gathered_per_step"].append([n for n, _ in obs.gathered])
        steps_gathered.append(obs.gathered)
    report["final_masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    report["stats"] = pg.stats(STEPS)
    report["densities"] = sp.layer_density()
    report["numel"] = {n: int(p.ds_numel) for n, p in engine.module.named_parameters()}
    report["sparse"] = sorted(sp.order)
    report["persistent"] = sorted(n for n, p in engine.module.named_parameters() if p.ds_persist)
    torch.distributed.barrier()
    return report, steps_gathered


def compare(dense: list, packed: list) -> dict:
    """Per step: the same gathers in the same order, every tensor equal (torch.equal) to DeepSpeed's dense one."""
    out = {"steps": len(dense), "tensors": 0, "mismatches": [], "same_sequence": True}
    for step, (a, b) in enumerate(zip(dense, packed)):
        if [n for n, _ in a] != [n for n, _ in b]:
            out["same_sequence"] = False
        for (na, ta), (nb, tb) in zip(a, b):
            out["tensors"] += 1
            if na != nb or ta.dtype != tb.dtype or not torch.equal(ta, tb):
                out["mismatches"].append([step, na, nb])
    return out


def main():
    out = sys.argv[1]
    results = {}
    for label, dtype, compact, gas in (("fp32", "fp32", False, 1), ("bf16_compact_gas2", "bf16", True, 2)):
        dense, dense_seq = run(False, dtype, compact, gas)
        packed, packed_seq = run(True, dtype, compact, gas)
        results[label] = {"dense": dense, "packed": packed, "compare": compare(dense_seq, packed_seq)}
    finish(results, out)


if __name__ == "__main__":
    main()
