"""Diagnostic behind the Adam momentum correction's second-moment estimate (docs/compression.md); not a bench.

Simulates N ranks in one process (each draws its own batch, as `dist-sparse train` does), trains the bench's model
(tinyshakespeare, char GPT-2 4 x 128, batch 8, AdamW lr 1e-3, betas 0.9/0.999) densely on the averaged gradient,
and compares Adam's true second moment (of the averaged gradient) with what rank 0 can estimate locally:

- ``fixed``: ``v / N + (1 - 1/N) avg(u_hat^2)`` (independent per-rank noise);
- ``fitted``: ``lam v + (1 - lam) avg(u_hat^2)`` with ``lam`` per tensor fitted to the true energy (what the
  shipped estimate does with a sketched energy).

Prints, every 50 steps, the ratio of the update norms (estimate / true) and quantiles of ``v_est / v_true``.

    python bench/diag_second_moment.py [--steps 200] [--ranks 2]
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SHAKESPEARE  # noqa: E402
from dist_sparse import config as C  # noqa: E402
from dist_sparse.data import TextData  # noqa: E402
from dist_sparse.integration.hf import build_causal_lm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    if not Path(SHAKESPEARE).is_file():
        print(f"skipped: {SHAKESPEARE} not found")
        return
    torch.manual_seed(0)
    cfg = C.load(ROOT / "configs" / "demo.yaml", ["model.n_embd=128", f"data.path={SHAKESPEARE}"])
    data = TextData(cfg.data, cfg.model.block_size, 0)
    model = build_causal_lm(cfg.model, data.tokenizer.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    b1, b2, n = 0.9, 0.999, args.ranks
    state = [{"v_true": torch.zeros_like(p), "m": torch.zeros_like(p), "v": torch.zeros_like(p),
              "u": torch.zeros_like(p), "w": torch.zeros_like(p)} for p in params]
    for step in range(1, args.steps + 1):
        grads = []
        for r in range(n):
            x = data.batch("train", step, r, 0, 8)
            model.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            grads.append([p.grad.detach().clone() for p in params])
        report = step % 50 == 0
        norms = {"true": 0.0, "fixed": 0.0, "fitted": 0.0}
        ratios = {"fixed": [], "fitted": []}
        for i, (p, s) in enumerate(zip(params, state)):
            gbar = sum(g[i] for g in grads) / n
            p.grad = gbar
            s["v_true"].mul_(b2).addcmul_(gbar, gbar, value=1 - b2)
            s["m"].mul_(b1).add_(gbar, alpha=1 - b1)
            g0 = grads[0][i]
            s["v"].mul_(b2).addcmul_(g0, g0, value=1 - b2)
            s["u"].mul_(b1).add_(g0, alpha=1 - b1)
            u_hat = s["u"] / (1 - b1**step)
            s["w"].mul_(b2).addcmul_(u_hat, u_hat, value=1 - b2)
            if not report:
                continue
            local, mom, energy = float(s["v"].sum()), float(s["w"].sum()), float(s["v_true"].sum())
            lam = 1 / n if local == mom else min(1.0, max(1 / n, (energy - mom) / (local - mom)))
            estimates = {"fixed": s["v"] / n + (1 - 1 / n) * s["w"], "fitted": lam * s["v"] + (1 - lam) * s["w"]}
            norms["true"] += float((s["m"] / (s["v_true"].sqrt() + 1e-8)).square().sum())
            for key, est in estimates.items():
                norms[key] += float((s["m"] / (est.sqrt() + 1e-8)).square().sum())
                ratios[key].append((est / s["v_true"].clamp_min(1e-30)).flatten())
        opt.step()
        if report:
            line = [f"step {step}"]
            for key in ("fixed", "fitted"):
                r = torch.cat(ratios[key])
                r = r[torch.randperm(r.numel(), generator=torch.Generator().manual_seed(step))[:100_000]]
                q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9])).tolist()
                line.append(f"{key}: update norm x{(norms[key] / norms['true']) ** 0.5:.3f}, v ratio p10/p50/p90 "
                            f"{q[0]:.2f}/{q[1]:.2f}/{q[2]:.2f}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
