"""An in-memory parameter view (the interface the sparsifier uses), for testing methods without DeepSpeed.

It views the range [start, start + length) of full tensors, like a ZeRO partition does; with ``replicated`` it
views whole tensors and scores the slice [score_start, score_start + score_len), like ZeRO stage 0.
"""



class TensorView:
    """Like ZeRO-0 in fp32 (``ReplicatedView``): the model's weights are the master weights."""

    model_needs_full_mask = False
    model_is_master = True
    store = None

    def __init__(self, name, weight, grad=None, state=None, start=0, length=None, score=None, replicated=False):
        self.name = name
        self.shape = tuple(weight.shape)
        self.numel = weight.numel()
        self.replicated = replicated
        length = self.numel - start if length is None else length
        self.mask_start, self.mask_len = (0, self.numel) if replicated else (start, length)
        self.score_start, self.score_len = score if score is not None else (self.mask_start, self.mask_len)
        lo, n = self.mask_start, self.mask_len
        self.w = weight.view(-1)[lo: lo + n]
        self.g = None if grad is None else grad.view(-1)[lo: lo + n]
        self.state = {k: v.view(-1)[lo: lo + n] for k, v in (state or {}).items()}

    def master(self):
        return self.w

    def grad(self):
        return self.g

    def mul_grad_(self, mask):
        self.g.masked_fill_(~mask, 0)

    def mul_master_(self, mask):
        self.w.masked_fill_(~mask, 0)

    def zero_state_(self, positions):
        for s in self.state.values():
            s.masked_fill_(positions, 0)

    def zero_model_(self, mask, full_mask=None):
        pass  # the model's weights are the master weights, which mul_master_ masks

    def add_grad_(self, delta):
        self.g.add_(delta.reshape(-1))
