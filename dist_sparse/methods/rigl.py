"""``rigl``: Rigging the Lottery (Evci, Gale, Menick, Castro & Elsen, ICML 2020), Algorithm 1.

Identical to SET except for the grow score: connections are regrown where the **dense gradient** magnitude is
largest (the gradient of the loss w.r.t. every weight, pruned ones included, on the mask-update step). In the paper
the update fraction follows the cosine schedule ``alpha/2 (1 + cos(pi t / T_end))`` (``drop_fraction_schedule:
cosine``); the default here keeps it constant at alpha, as SET does, which measured better at this project's scale
(docs/methods.md, "Drop fraction"). Updates happen every Delta-T steps until T_end; the update step replaces the
optimizer step (the paper's Algorithm 1, `else` branch). Regrown weights start at 0 with reset optimizer moments.
"""

import torch

from dist_sparse.methods.set import SET


class RigL(SET):
    name = "rigl"
    needs_dense_grad = True

    def __init__(self, *args, grow_grad_steps: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.grow_grad_steps = grow_grad_steps  # 1: the paper's gradient of the update step's batch

    def grow_window(self) -> int:
        return self.grow_grad_steps

    def grow_scores(self, s, step: int) -> torch.Tensor:
        if s.grad is None:
            raise RuntimeError(f"RigL needs the dense gradient of {s.name} on mask-update steps; none is available")
        return s.grad.abs().to(torch.float32)
