"""Worker for tests/test_compression_internode.py: 4 ranks under torchrun, presented as 2 nodes x 2 ranks
(``DIST_SPARSE_HOST`` names rank r's node ``node{r // 2}``, as our launchers name hosts), one or more ZeRO stages.

Trains a tiny GPT-2 with RigL through ``dist_sparse.initialize``: uncompressed, ``compression.scope: inter_node`` at
density 1.0 (must reproduce the uncompressed run to rounding: only the summation order differs) and at top-k 10%
with error feedback and momentum correction (bytes, sent coordinates), for every stage in argv[1] (comma-separated:
one 4-rank process group runs them all, start-up dominates). Rank 0 writes a JSON report to argv[2]: per rank,
stage -> runs."""

import os
import sys

os.environ["DIST_SPARSE_HOST"] = f"node{int(os.environ['RANK']) // 2}"

import torch  # noqa: E402

import dist_sparse  # noqa: E402
from dist_sparse.compression import traffic  # noqa: E402
from dist_sparse.memory import plan as P  # noqa: E402
from dist_sparse.step import StepSchedule  # noqa: E402
from tests.workers import finish, tiny_gpt2, tiny_rigl_config, tiny_step  # noqa: E402

STEPS = 6


def run(stage: int, compression: dict | None) -> dict:
    model = tiny_gpt2()
    config = tiny_rigl_config(stage)
    if compression is not None:
        config["compression"] = compression
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3)
    sp, comp = engine.sparsifier, engine.compression
    rank = torch.distributed.get_rank()
    report = {"grads": [], "losses": [], "sent_outside": 0, "sent_total": 0, "replaced": [],
              "sparsified": sorted(v.name for v in sp.views)}
    original_before = sp.before_step

    def recording_before_step(plan):
        if comp is not None and not plan.dense_grad:  # on compressed steps nothing pruned is ever sent
            masks = {n: m.reshape(-1) for n, m in sp.full_masks().items()}  # a collective (masks stay sharded)
            for name, idx in comp.compression.last_sent.items():
                mask = masks.get(name)
                if mask is not None:
                    report["sent_outside"] += int((~mask[idx]).sum())
                report["sent_total"] += int(idx.numel())
        original_before(plan)
        report["grads"].append({v.name: v.grad().float().tolist() for v in engine.param_views})
        report["replaced"].append(bool(plan.replaces_optimizer_step))

    sp.before_step = recording_before_step
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        report["losses"].append(tiny_step(engine, g))
    report["masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    if comp is not None:
        report["stats"] = comp.stats(STEPS)
        # the planner's prediction for this model, masks and schedule (DeepSpeed built one group from the model)
        names = {v.name for v in sp.views}
        full = sp.full_masks()
        densities = {n: float(full[n].float().mean()) for n in names}
        setting = P.model_setting(model, names, densities, [list(model.parameters())], world_size=4, zero_stage=stage)
        report["predicted"] = traffic.predict(setting, 2, comp.compression.cfg, STEPS, StepSchedule(sp.method))
    return report


def runs_at(stage: int) -> dict:
    return {"rigl": run(stage, None),
            "inter1": run(stage, {"method": "topk", "density": 1.0, "scope": "inter_node",
                                  "momentum_correction": False}),
            "inter": run(stage, {"method": "topk", "density": 0.1, "scope": "inter_node",
                                 "momentum_correction": True})}


def main():
    stages, out = [int(x) for x in sys.argv[1].split(",")], sys.argv[2]
    finish({str(stage): runs_at(stage) for stage in stages}, out)


if __name__ == "__main__":
    main()
