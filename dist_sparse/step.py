"""One optimizer step as a list of components, and the one place that says what kind of step it is.

The engine wrapper (``dist_sparse.integration.engine.SparseEngine``) runs its components in order at fixed points
of DeepSpeed's step and owns only the policy for steps that must be skipped (a non-finite loss or gradient on
some rank, an fp16 overflow). A component is what holds state across steps and acts on it: the sparsifier (masks),
gradient compression (residuals), compact state (packed master weights and moments), accounting (measured bytes).
Each sees the engine's :class:`StepPlan` for the step, and none of them asks another one what kind of step this is.

The hooks, in the order the engine calls them within one optimizer step::

    before_forward(plan)         before each micro-batch's forward (a method may write the weights it runs)
    before_backward(plan)        before each micro-batch's backward
    --- DeepSpeed's backward: gradients reduced into partitions (or kept local, when a component reduces) ---
    reduce_gradients(plan)       at the accumulation boundary, after the finiteness check: a component that took
                                 over the reduction runs it here
    before_step(plan)            after the reduction, before DeepSpeed's norm/clipping/optimizer step
    --- DeepSpeed's step; the inner optimizer's step is skipped when ``plan.skip_optimizer_step`` ---
    after_optimizer_step(plan)   right after the inner optimizer stepped the fp32 master weights
    skipped_step(plan)           instead of reduce/before_step, on a step skipped on every rank

and, outside the step, ``state_dict``/``load_state_dict`` (what the component's checkpoint entry holds, plain
Python values; tensors it keeps per rank are saved by the checkpoint code through the views) and ``bytes_held``
(the bytes of state it keeps, by ``state_bytes_per_rank`` category).
"""

from dataclasses import dataclass, field


@dataclass
class StepPlan:
    """What kind of step ``step`` (the number of optimizer steps completed before it) is, decided once.

    ``mask_update``: the method changes masks on this step. ``dense_grad``: the gradients of *pruned* positions are
    used on this step (RigL's growth, and its growth window), so every reduction must deliver them.
    ``replaces_optimizer_step``: the mask update takes the place of the optimizer step (RigL's Algorithm 1).
    ``skip_optimizer_step`` starts as that and is also set when the step is skipped on every rank."""

    step: int
    mask_update: bool = False
    dense_grad: bool = False
    replaces_optimizer_step: bool = False
    skip_optimizer_step: bool = False
    skipped: bool = False  # skipped on every rank (non-finite, fp16 overflow): nothing changes
    overflow: bool = False  # skipped for an fp16 overflow: DeepSpeed's loss scaler must see it (and lower the scale)
    notes: dict = field(default_factory=dict)

    def exchanges_dense(self, window_in_exchange: bool) -> bool:
        """Whether a gradient exchange sends the sparsified tensors dense on this step: on every ``dense_grad`` step,
        except a growth window's steps before its update when the exchange keeps the window in local sums."""
        return self.dense_grad and (self.mask_update or not window_in_exchange)


class StepSchedule:
    """Decides :class:`StepPlan` for every step from the sparse method (``None``: dense training). Everything that
    needs to know whether a step is a mask-update or dense-gradient step asks this object, and this object asks
    the method; the answer for a step never changes."""

    def __init__(self, method=None):
        self.method = method

    def is_update_step(self, step: int) -> bool:
        return self.method is not None and self.method.is_update_step(step)

    def uses_dense_grad(self, step: int) -> bool:
        """Whether the gradient of pruned positions is used at ``step``: on mask-update steps of methods that grow
        by gradient (RigL), and on the ``grow_grad_steps - 1`` steps before them when the growth score is the mean
        gradient of a window. On every other step only active coordinates' gradients matter."""
        m = self.method
        if m is None or not m.needs_dense_grad:
            return False
        return any(m.is_update_step(step + j) for j in range(m.grow_window()))

    def plan(self, step: int) -> StepPlan:
        update = self.is_update_step(step)
        replaces = update and self.method.replaces_optimizer_step
        return StepPlan(step, mask_update=update, dense_grad=self.uses_dense_grad(step),
                        replaces_optimizer_step=replaces, skip_optimizer_step=replaces)


class Component:
    """The step interface; a component overrides the hooks it needs (the base ones do nothing)."""

    name = "component"

    def before_forward(self, plan: StepPlan) -> None:
        pass

    def before_backward(self, plan: StepPlan) -> None:
        pass

    def reduce_gradients(self, plan: StepPlan) -> None:
        pass

    def before_step(self, plan: StepPlan) -> None:
        pass

    def after_optimizer_step(self, plan: StepPlan) -> None:
        pass

    def skipped_step(self, plan: StepPlan) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def bytes_held(self) -> dict:
        """Bytes of state this component keeps per rank, by ``state_bytes_per_rank`` category."""
        return {}
