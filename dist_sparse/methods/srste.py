"""``sr_ste``: Sparse-refined straight-through estimator (Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun & Li, ICLR 2021,
"Learning N:M fine-grained structured sparse neural networks from scratch"), their Eq. 6.

Dense weights W are kept and stepped by the optimizer (``dense_weights``); every iteration the forward runs on the
N:M-pruned weight W~ = S(W) * W, where S keeps the N largest |w| of every group of M consecutive input weights,
recomputed from the *current* W before each step's forward (``reselects_before_forward``). The gradient of W~ is
applied to W as it is (straight-through: pruned positions get it too), plus the sparse-refined term
lambda_W * (1 - S(W)) * W on the pruned weights only, which pulls the pruned weights towards 0 and so damps the
mask's flipping between iterations (``sparsity.srste_decay`` is the paper's lambda_W, default 2e-4 as in its ImageNet
runs). The term is added to the gradient, as the paper's update ``W <- W - lr * (g(W~) + lambda_W * (~S) * W)``
writes it for SGD; under Adam/AdamW it is therefore normalised with the gradient (stated, not changed). The final
export is W~ of the final W: exactly N:M.

Needs ``sparsity.pattern`` N:M (the config refuses anything else), master weights apart from the model (ZeRO >= 1
or bf16/fp16), and neither compact state (which stores only the kept masters) nor gradient compression (which
would drop the straight-through gradient of pruned positions).
"""

from dist_sparse.methods.base import SparseMethod


class SRSTE(SparseMethod):
    name = "sr_ste"
    dense_weights = True
    adjusts_grads = True
    reselects_before_forward = True

    def __init__(self, *args, decay: float = 2e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay = decay  # lambda_W

    def is_update_step(self, step: int) -> bool:
        # the per-iteration N:M choice is part of the forward, not a scheduled mask update (no weights are dropped,
        # no moments reset: W stays dense)
        return False

    def magnitude_masks(self, slices: list, select) -> list:
        """S(W): the N largest |w| of every group (exact across ranks through the pattern)."""
        scores = [s.weight.abs() for s in slices]
        return self.select(slices, scores, [None] * len(slices), self.target_keep(slices, self.densities), select)

    def initial_masks(self, slices, select):
        return self.magnitude_masks(slices, select)

    def update(self, step, slices, select):
        return self.magnitude_masks(slices, select)

    def grad_deltas(self, step, slices):
        return [None if s.weight is None else self.decay * (~s.mask).to(s.weight.dtype) * s.weight for s in slices]
