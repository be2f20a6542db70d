"""Masks stay sharded at any scale (issue 18): the senders that select from their whole local gradient (compact
state's packed reduction, gradient compression) build one tensor's full mask at a time from the ranks' shards.

One 2-rank worker (tests/workers/sharded_masks_worker.py) trains compact ZeRO-3 bf16 and compact ZeRO-2 fp32 +
top-k compression, each with sharded masks (the default) and with ``sparsity.replicate_masks: true``. Checked:
between steps a rank holds only its own mask bits; the transient is one tensor's bits; the bytes handed to the
masks' all-gathers equal the formula on every step; losses and final masks equal the replicated path's bit for bit.
"""

import json

import pytest

from dist_sparse import config as C
from dist_sparse.errors import ConfigError
from dist_sparse.masks.sharded import MaskSource
from tests.distributed_utils import run_torchrun


def test_replicate_masks_key_is_typed_and_defaults_to_sharded():
    assert C.from_dict({}).sparsity.replicate_masks is False
    assert C.from_dict({"sparsity": {"replicate_masks": True}}).sparsity.replicate_masks is True
    with pytest.raises(ConfigError) as err:
        C.from_dict({"sparsity": {"replicate_masks": "yes"}})
    assert err.value.key == "sparsity.replicate_masks"


def test_mask_source_on_one_rank_needs_no_collective():
    """Stage 0 (the sparsifier's masks are whole): the source hands them out and keeps nothing."""
    import torch

    from dist_sparse.masks.packing import pack_bits

    class View:
        name, numel, mask_start, mask_len, replicated = "w", 10, 0, 10, True

    class Sparsifier:
        views = [View()]
        mask_bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
        packed = {"w": pack_bits(mask_bits)}

        def mask(self, name):
            return self.mask_bits

    source = MaskSource(Sparsifier())
    source.refresh((0, 0))
    assert torch.equal(source.full("w"), Sparsifier.mask_bits) and source.get("b", "none") == "none"
    assert source.counts() == {"w": [5]} and source.held_bytes() == 0 and source.sync_bytes() == 0


@pytest.mark.slow
def test_masks_stay_sharded_between_steps_and_match_the_replicated_path(tmp_path):
    out = tmp_path / "report.json"
    run_torchrun("sharded_masks_worker.py", 2, out)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for rank, runs in enumerate(per_rank):
        for label in ("zero3_bf16", "zero2_fp32_topk"):
            sharded, replicated = runs[f"{label}/sharded"], runs[f"{label}/replicated"]
            where = f"{label} rank {rank}"
            assert not sharded["replicate"] and replicated["replicate"], where
            # exactness: the same bits select the same values
            assert sharded["losses"] == replicated["losses"], f"{where}: losses differ"
            assert sharded["final_masks"] == replicated["final_masks"], f"{where}: masks differ"
            assert sharded["updates"] == replicated["updates"] >= 2, where
            own, full = sharded["own_bits"], sharded["full_bits"]
            assert own < full, where  # 2 ranks: the own bits are about half
            for row in sharded["steps"]:
                at = f"{where} step {row['step']}"
                # between steps: nothing kept beyond the sparsifier's own bits, the last mask released
                assert row["held"] == 0 and row["last_released"], at
                if "measured_masks" in row:
                    assert row["measured_masks"] == own, f"{at}: masks {row['measured_masks']} != own bits {own}"
                # the bytes handed to the masks' all-gathers equal the formula (dense steps: none)
                assert row["handed"] == row["expected"], f"{at}: handed {row['handed']} != {row['expected']}"
            assert any(r["dense"] for r in sharded["steps"]) and any(not r["dense"] for r in sharded["steps"]), where
            # ZeRO-3: every rank holds a shard of each tensor (one all-gather); ZeRO-2: a tensor lies in one or two
            # partitions, so its owners broadcast their parts (no padding to a whole tensor on every rank)
            assert (sharded["broadcast_tensors"] > 0) == (label == "zero2_fp32_topk"), where
            # the transient: one tensor's gathered bits at a time, bounded by the largest tensor
            assert 0 < sharded["max_in_flight"] <= sharded["largest_bound"] < full, where
            stats = sharded["stats"]
            assert stats["mask_sync_bytes_per_step"] == pytest.approx(
                sum(r["handed"] for r in sharded["steps"]) / len(sharded["steps"])), where
            if label == "zero3_bf16":  # the packed reduction's total includes its mask traffic
                assert stats["grad_reduce_bytes_per_step"] > stats["mask_sync_bytes_per_step"] > 0, where
            # replicated (the former behaviour): the full masks kept between steps, bits moved only on a change
            for row in replicated["steps"]:
                assert row["held"] == full, where
                if "measured_masks" in row:
                    assert row["measured_masks"] == own + full, where
            assert replicated["max_in_flight"] == 0, where
            assert sum(r["handed"] for r in replicated["steps"]) > 0, where
