"""Magnitude pruning, per layer: drop the weights of smallest ``|W|`` in each prunable layer (no calibration data)."""

import torch

from dist_sparse.oneshot.nm import nm_mask_from_scores


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None):
    """Bool keep-mask for ``weight`` ``[out, in]``.

    Unstructured: exactly ``round(sparsity * numel)`` weights of smallest magnitude are pruned, compared across the
    whole layer (layer-wise threshold, the classic baseline of Han et al. 2015 as used in the SparseGPT and Wanda
    papers). N:M: the N largest ``|W|`` of every M consecutive input columns are kept.
    """
    scores = weight.detach().abs().float()
    if nm is not None:
        return nm_mask_from_scores(scores, *nm)
    k = int(round(float(sparsity) * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        drop = torch.topk(scores.flatten(), k, largest=False).indices
        mask[drop] = False
    return mask.reshape(scores.shape)
