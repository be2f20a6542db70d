"""Per-rank compression state: error-feedback residuals, DGC momentum correction, the warm-up density schedule.

For each tensor a rank wants to send, :meth:`ErrorFeedback.compress` forms the vector to sparsify, lets the
compressor select coordinates, and keeps what was not sent:

- plain (``error_feedback: false``): ``acc = g``; unsent coordinates are dropped.
- error feedback (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with memory"): ``acc = g + r``; the sent
  coordinates leave, ``r <- acc - sent``. Exactly: ``scatter(sent) + r_new == g + r_old`` (no rounding: the
  residual is ``acc`` with the sent positions set to 0).
- momentum correction (Lin et al. 2018, "Deep Gradient Compression", Sec. 3.2): ``u <- m u + g``,
  ``v <- v + u`` and ``acc = v``; after sending, both ``u`` and ``v`` are zeroed at the sent positions
  (*momentum factor masking*), so a stale momentum does not keep pushing a coordinate that was just applied.
  The optimizer then receives the aggregated velocity and must not apply momentum itself (see
  :mod:`dist_sparse.integration.ds_compression`). For Adam the momentum is Adam's exponential average,
  ``u <- b1 u + (1 - b1) g`` (``ema=True``), error feedback runs on ``u`` and there is *no* momentum factor
  masking: what is sent over time then sums to exactly the first moments dense Adam would apply (at density 1 it is
  Adam's ``m``; 1-bit Adam, Tang et al. 2021, compresses the momentum the same way), while masking would cut the
  step of coordinates sent often by up to ``1 - b1``. The second moment is kept local too
  (:mod:`dist_sparse.compression.adam`).

Own range (ZeRO stages 1/2): a rank steps only its partition, and its own contribution to that range never
crosses the wire, so it is delivered whole (``own``, residual 0 there) and the ``k`` coordinates it sends are
chosen outside the range (:meth:`ErrorFeedback.compress`). ``k`` stays ``density`` x the tensor's unpruned
coordinates, so the bytes are those of the same density without the range.

Mask-aware: ``eligible`` is the set of coordinates the weight mask keeps. Pruned coordinates are zeroed in ``acc``
before selection, so they are never sent and never enter (or stay in) a residual; the same holds for every other
per-coordinate buffer (DGC momentum, the second moment and the squared momentum of Adam's correction).

Packed buffers (``packed=True``, used with compact state, docs/memory.md): since every buffer is 0 at the pruned
coordinates after each :meth:`ErrorFeedback.compress`, it is stored between steps as the values of the unpruned
coordinates only (packed by the mask of that compress, whose bits are kept), and unpacked to a dense transient for
the next compress of that tensor (one tensor at a time). The arithmetic is that of the dense buffers, bit for bit;
a dense checkpoint (``state_tensors``) is written either way.

Warm-up (DGC Sec. 3.4): the density ramps exponentially from 1 (dense) to the target over ``warmup_steps``
optimizer steps: ``density_t = target ** (t / warmup_steps)`` (DGC's 75%, 93.75%, 98.4%, 99.6% sparsity
schedule is such a geometric ramp).
"""

import torch

from dist_sparse.compression.base import wire_count
from dist_sparse.masks.packing import pack_bits, unpack_bits


def _unpacked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.numel(), dtype=values.dtype, device=values.device)
    return out.masked_scatter_(mask.to(values.device), values)


class ErrorFeedback:
    """Residuals (and momenta) of one rank, keyed by tensor name; flat tensors on the gradient's device (full, or
    packed by the mask with ``packed``), kept in ``storage_dtype`` (fp32, or bf16 for half the bytes)."""

    def __init__(self, compressor, density: float, error_feedback: bool = True, momentum: float | None = None,
                 warmup_steps: int = 0, ema: bool = False, precondition_beta2: float | None = None,
                 world: int = 1, packed: bool = False, storage_dtype: torch.dtype = torch.float32):
        self.compressor = compressor
        # the dtype the per-coordinate buffers are kept in between compress calls (compression.residual_dtype);
        # every compress works on fp32 copies of one tensor's buffers and rounds them back after it
        self.storage_dtype = storage_dtype
        # keep the per-coordinate buffers of a masked tensor packed by its mask between compress calls
        self.packed = bool(packed)
        self.layout: dict = {}  # name -> (packed mask bits, numel): the layout of that tensor's packed buffers
        # Adam momentum correction: this rank estimates Adam's second moment of the *averaged* gradient (see
        # second_moment_estimate) and top-k ranks coordinates by the step they would make, |acc| / sqrt(v)
        # (None: rank by |acc|, as top-k for SGD does)
        self.precondition_beta2 = precondition_beta2
        self.world = int(world)
        self.second_moment: dict = {}  # running average of the local squared gradient
        self.momentum_square: dict = {}  # running average of the squared (bias-corrected) local momentum
        self.moment_steps: dict = {}  # updates of each tensor's local momentum (for its bias correction)
        self.energy: dict = {}  # running average of the sketched energy of the averaged gradient (a float)
        self.blend: dict = {}  # the local second moment's weight in the estimate, fitted to that energy
        self.ema = bool(ema)  # momentum as an exponential average (Adam's first moment), not SGD's sum
        self.target_density = float(density)
        self.error_feedback = bool(error_feedback)
        self.momentum = momentum  # None: no momentum correction
        self.warmup_steps = int(warmup_steps)
        self.residual: dict = {}
        self.velocity_momentum: dict = {}  # DGC's u (the local momentum), only with momentum correction

    def density(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.target_density
        return self.target_density ** (step / self.warmup_steps)

    def _stores(self) -> tuple:
        return self.residual, self.velocity_momentum, self.second_moment, self.momentum_square

    def _dense(self, store: dict, name: str) -> torch.Tensor:
        """``store[name]`` as a dense flat fp32 tensor (a new one when it is kept packed or in a lower dtype)."""
        layout = self.layout.get(name)
        t = store[name] if layout is None else _unpacked(store[name], unpack_bits(*layout))
        return t.float()

    def _unpack(self, name: str) -> None:
        """Make ``name``'s buffers dense fp32 for a compress (a transient of this one tensor)."""
        for store in self._stores():
            if name in store and (name in self.layout or store[name].dtype != torch.float32):
                store[name] = self._dense(store, name)
        self.layout.pop(name, None)

    def _pack(self, name: str, eligible: torch.Tensor | None) -> None:
        """After a compress: keep only the unpruned coordinates of ``name``'s buffers (all 0 elsewhere) when
        packed, in the storage dtype (round to nearest: the next compress continues from the rounded values, so a
        resumed run sees what an uninterrupted one does)."""
        pack = self.packed and eligible is not None
        for store in self._stores():
            if name in store:
                t = store[name][eligible.to(store[name].device)] if pack else store[name]
                store[name] = t.to(self.storage_dtype)
        if pack:
            self.layout[name] = (pack_bits(eligible), eligible.numel())

    def buffers(self) -> dict:
        """The tensors this rank keeps, as stored (packed or dense) with the packed layouts' bits (accounting)."""
        out = {f"{n}::{k}": t for k, store in zip(("residual", "momentum", "second_moment", "momentum_square"),
                                                 self._stores()) for n, t in store.items()}
        out.update({f"{n}::layout": bits for n, (bits, _) in self.layout.items()})
        return out

    def _buffer(self, store: dict, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = store.get(name)
        if buf is None or buf.shape != like.shape or buf.device != like.device:
            buf = store[name] = torch.zeros_like(like, dtype=torch.float32)
        return buf

    @property
    def wants_energy(self) -> bool:
        """True when the second-moment estimate uses the sketched energy of the averaged gradient."""
        return self.precondition_beta2 is not None and self.momentum is not None and self.world > 1

    @torch.no_grad()
    def accumulate(self, name: str, grad: torch.Tensor, eligible: torch.Tensor | None,
                   energy: float | None = None) -> torch.Tensor:
        """The vector to sparsify for ``name``: gradient (+ residual, or DGC velocity), zero where pruned.

        With error feedback it *is* the residual buffer (updated in place); call :meth:`sent` after selecting."""
        self._unpack(name)
        grad = grad.reshape(-1).float()
        if not self.error_feedback:
            acc = grad.clone()
        elif self.momentum is None:
            acc = self._buffer(self.residual, name, grad)
            acc.add_(grad)
        else:
            u = self._buffer(self.velocity_momentum, name, grad)
            u.mul_(self.momentum).add_(grad, alpha=1 - self.momentum if self.ema else 1.0)
            acc = self._buffer(self.residual, name, grad)
            acc.add_(u)
            if eligible is not None:
                u.masked_fill_(~eligible, 0)
        if eligible is not None:
            acc.masked_fill_(~eligible, 0)  # pruned coordinates are never sent and never kept
        if self.precondition_beta2 is not None:
            b2 = self.precondition_beta2
            v = self._buffer(self.second_moment, name, grad)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            if eligible is not None:
                v.masked_fill_(~eligible, 0)
            if self.momentum is not None:
                u = self.velocity_momentum[name]
                # u starts at 0, so it is biased low by (1 - b1^t) over its first ~1/(1-b1) updates; squared
                # uncorrected, that bias would stay in the b2 average for ~1/(1-b2) steps and make the early
                # estimate too small (and with it the early steps too large). Average the bias-corrected u instead.
                t = self.moment_steps[name] = self.moment_steps.get(name, 0) + 1
                correction = (1 - self.momentum ** t) ** 2 if self.ema else 1.0
                w = self._buffer(self.momentum_square, name, grad).mul_(b2).addcmul_(u, u, value=(1 - b2) / correction)
                if eligible is not None:  # as every buffer: nothing of a pruned coordinate stays behind
                    w.masked_fill_(~eligible, 0)
                if energy is not None:
                    self.energy[name] = b2 * self.energy.get(name, 0.0) + (1 - b2) * float(energy)
                    self.blend[name] = self._fit_blend(self.energy[name], float(v.sum()), float(w.sum()))
        return acc

    def _fit_blend(self, energy: float, local: float, momentum: float) -> float:
        """The weight ``lam`` of the local second moment for which ``lam v + (1 - lam) avg(u^2)`` sums, over the
        tensor, to the running average of the averaged gradient's energy; within ``[1/N, 1]``, the range between
        independent and fully correlated per-step gradients (1/N when undetermined: both sums equal). ``avg(u^2)``
        may exceed ``v`` (early on, or for a steady gradient); the fit is the same."""
        low = 1.0 / self.world
        if local == momentum:
            return low
        return min(1.0, max(low, (energy - momentum) / (local - momentum)))

    def second_moment_estimate(self, name: str, start: int = 0, length: int | None = None) -> torch.Tensor:
        """This rank's estimate of Adam's second moment of the gradient *averaged over the N ranks*, per coordinate.

        Adam's ``v`` averages ``gbar^2``. Per coordinate it lies between two things a rank has: its local ``v``
        (the running average of ``g^2``; right when the ranks' per-step gradients agree) and, when the ranks' noise
        is independent, ``v / N + (1 - 1/N) avg(u^2)`` (the local momentum ``u`` averages the noise away). Which
        holds differs per tensor and drifts: measured on tinyshakespeare (2 ranks) the weight of ``v`` is 0.6-0.9,
        not 1/2, because much of a step's gradient is shared by all ranks yet changes too fast for the momentum to
        keep. So the estimate is ``lam v + (1 - lam) avg(u^2)`` with ``lam`` per tensor fitted (each step) to the
        running energy of the averaged gradient (:mod:`dist_sparse.compression.sketch`), within ``[1/N, 1]``;
        before the first fit ``lam = 1/N``. N = 1 gives exactly the local (= Adam's) ``v``.

        ``start``/``length``: only that range of the flat tensor (a rank's partition), computed on the range only."""
        v = self._dense(self.second_moment, name)
        length = v.numel() - start if length is None else length
        v = v.narrow(0, start, length)
        if self.world == 1 or name not in self.momentum_square:
            return v
        lam = self.blend.get(name, 1.0 / self.world)
        return v * lam + self._dense(self.momentum_square, name).narrow(0, start, length) * (1 - lam)

    def ranking(self, name: str, acc: torch.Tensor) -> torch.Tensor:
        """What the compressor ranks: ``acc``, or with Adam preconditioning the step each coordinate would make,
        ``|acc| / (sqrt(v) + eps)`` (a per-tensor constant such as Adam's bias correction does not change a
        per-tensor ranking, so it is left out)."""
        if self.precondition_beta2 is None:
            return acc
        return acc / self.second_moment_estimate(name).sqrt().add_(1e-8)

    @torch.no_grad()
    def sent(self, name: str, acc: torch.Tensor, indices: torch.Tensor) -> None:
        """Remove the sent coordinates from the residual (and DGC momentum): ``r <- acc - sent``."""
        if not self.error_feedback:
            return
        acc.index_fill_(0, indices, 0)
        if self.momentum is not None and not self.ema:
            self.velocity_momentum[name].index_fill_(0, indices, 0)

    def compress(self, name: str, grad: torch.Tensor, eligible: torch.Tensor | None, step: int, stream: int,
                 density: float | None = None, local: tuple | None = None, energy: float | None = None) -> tuple:
        """(indices, values, own) this rank sends for ``name``; residual state is updated.

        ``local = (start, length)``: the range of the tensor this rank owns (its ZeRO partition). Its reduced
        values stay on this rank, so they never cross the wire and are not compressed: ``own`` is the whole of
        ``acc`` over that range (the residual there drops to 0, as for any sent coordinate), and the selection
        picks ``k = keep_count(eligible, density)`` coordinates among the rest (:func:`wire_count`).
        ``own`` is None without ``local``."""
        acc = self.accumulate(name, grad, eligible, energy)
        d = self.density(step) if density is None else density
        ranking = self.ranking(name, acc)
        if local is None or local[1] == 0:
            idx = self.compressor.select(ranking, eligible, d, step=step, stream=stream)
            own = None if local is None else acc[:0].clone()
        else:
            start, length = local
            candidates = eligible.clone() if eligible is not None else torch.ones_like(acc, dtype=torch.bool)
            candidates[start: start + length] = False
            n_eligible = acc.numel() if eligible is None else int(eligible.sum())
            n_candidates = int(candidates.sum())
            k = wire_count(n_eligible, n_candidates, d)
            # threshold selection has no fixed k: scale its density so it, too, aims at k of the candidates
            d_candidates = min(1.0, d * n_eligible / n_candidates) if n_candidates else 1.0
            idx = self.compressor.select(ranking, candidates, d_candidates, step=step, stream=stream, k=k)
            own = acc[start: start + length].clone()
        values = acc[idx].clone()
        self.sent(name, acc, idx)
        if own is not None and own.numel():
            self._delivered_locally(name, acc, local)
        self._pack(name, eligible)
        return idx, values, own

    @torch.no_grad()
    def deliver_all(self, name: str, grad: torch.Tensor, eligible: torch.Tensor | None,
                    energy: float | None = None) -> torch.Tensor:
        """A dense step of ``name`` (RigL's mask-update step): every coordinate is sent. Unpruned coordinates carry
        what error feedback has accumulated for them (gradient, or DGC/Adam momentum, plus residual), so the
        optimizer sees the same stream as on compressed steps and nothing stays behind; pruned coordinates carry
        the raw gradient, which only growth reads. State is updated as if every unpruned coordinate was sent."""
        flat = grad.reshape(-1).float()
        acc = self.accumulate(name, flat, eligible, energy)
        out = acc.clone() if eligible is None else torch.where(eligible, acc, flat)
        if self.error_feedback:
            self.sent(name, acc, torch.arange(acc.numel(), device=acc.device) if eligible is None
                      else torch.nonzero(eligible).reshape(-1))
        self._pack(name, eligible)
        return out

    def _delivered_locally(self, name: str, acc: torch.Tensor, local: tuple) -> None:
        """The owned range was applied in full: as for sent coordinates, nothing of it stays behind."""
        if not self.error_feedback:
            return
        start, length = local
        acc[start: start + length] = 0
        if self.momentum is not None and not self.ema:  # DGC momentum factor masking, as in sent()
            self.velocity_momentum[name][start: start + length] = 0

    # -- checkpointing: per-rank tensors keyed "{name}::residual" / "::momentum" / "::second_moment" -----------
    def state_tensors(self) -> dict:
        """Dense tensors (packed buffers are unpacked: the checkpoint format does not depend on ``packed``)."""
        out = {f"{n}::residual": self._dense(self.residual, n) for n in self.residual}
        out.update({f"{n}::momentum": self._dense(self.velocity_momentum, n) for n in self.velocity_momentum})
        out.update({f"{n}::second_moment": self._dense(self.second_moment, n) for n in self.second_moment})
        out.update({f"{n}::momentum_square": self._dense(self.momentum_square, n) for n in self.momentum_square})
        out.update({f"{n}::moment_steps": torch.tensor([float(t)]) for n, t in self.moment_steps.items()})
        # float64: the running energy and the fitted blend are restored bit for bit
        out.update({f"{n}::energy": torch.tensor([e, self.blend[n]], dtype=torch.float64)
                    for n, e in self.energy.items()})
        return out

    def load_state_tensors(self, tensors: dict, device=None) -> None:
        self.reset()
        stores = {"residual": self.residual, "momentum": self.velocity_momentum, "second_moment": self.second_moment,
                  "momentum_square": self.momentum_square}
        for key, t in tensors.items():
            name, kind = key.rsplit("::", 1)
            if kind == "moment_steps":
                self.moment_steps[name] = int(t.reshape(-1)[0])
                continue
            if kind == "energy":
                self.energy[name], self.blend[name] = (float(x) for x in t.reshape(-1).tolist())
                continue
            store = stores.get(kind)
            if store is None:
                raise KeyError(f"unknown compression state tensor {key!r}")
            store[name] = t.to(device=device, dtype=self.storage_dtype).reshape(-1).clone()

    def reset(self) -> None:
        self.residual, self.velocity_momentum, self.second_moment, self.momentum_square = {}, {}, {}, {}
        self.moment_steps, self.energy, self.blend = {}, {}, {}
        self.layout = {}
