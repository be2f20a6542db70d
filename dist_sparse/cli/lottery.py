"""`dist-sparse lottery CONFIG --rounds R --prune-fraction P --rewind-step K [--control reinit] [--set ...]
[--nproc N]`: iterative magnitude pruning with rewinding.

Frankle & Carbin (ICLR 2019, "The lottery ticket hypothesis") with rewinding (Frankle, Dziugaite, Roy & Carbin,
ICML 2020, "Linear mode connectivity and the lottery ticket hypothesis"). Round 0 trains dense for
``train.steps`` steps, saving the state of step K. Each of the R rounds then prunes the fraction P of the remaining
weights by magnitude (of the previous round's final weights; one threshold over all sparsified layers for
``sparsity.distribution: global``, per layer otherwise), resets the surviving weights to their state at step K --
weights, Adam moments, learning-rate schedule and data position, pruned positions zeroed (``dist-sparse train
--rewind``) -- and trains steps K..``train.steps`` again with the mask fixed (``static``). K = 0 is the original
hypothesis: the rounds restart from the initial weights (the same seed). The final sparsity is 1 - (1 - P)^R;
``sparsity.sparsity``, if the config sets it, must agree.

Every round is its own run directory under ``train.output_dir`` (``round-00/``, ``round-01/``, ...: config,
summary, metrics, checkpoints, ``final/`` with the masks), next to the masks it was started with
(``masks-round-NN/``). ``lottery.json`` (a contract) lists the finished rounds: ``round``, ``sparsity`` (achieved),
``val_loss`` (``final_val_loss``), ``dir``; plus ``rounds``, ``prune_fraction``, ``rewind_step`` and, with
``--control reinit``, ``control``: the final masks trained from a fresh random initialisation with seed
``train.seed + 1000`` (the comparison that makes a ticket a ticket). Running the same command again resumes: finished
rounds are kept, an interrupted round continues from its newest committed checkpoint.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_sparse import config as config_mod
from dist_sparse.errors import DistSparseError
from dist_sparse.metrics import write_json_atomic

CONTROL_SEED_OFFSET = 1000  # the reinit control's seed: train.seed + this (stated in lottery.json)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sparse lottery", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--rounds", type=int, required=True, help="pruning rounds R after the dense round 0")
    p.add_argument("--prune-fraction", type=float, required=True, help="fraction P of the remaining weights pruned "
                                                                       "per round")
    p.add_argument("--rewind-step", type=int, required=True, help="step K whose training state the survivors are "
                                                                  "reset to (0: the initial weights)")
    p.add_argument("--control", choices=["reinit"], default=None,
                   help="also train the final masks from a fresh random initialisation (seed train.seed + 1000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nproc", type=int, default=None)
    return p


def _check(args, cfg, raw) -> None:
    if args.rounds < 1:
        raise config_mod.ConfigError("--rounds", "must be >= 1")
    if not 0.0 < args.prune_fraction < 1.0:
        raise config_mod.ConfigError("--prune-fraction", "must be in (0, 1)")
    if not 0 <= args.rewind_step < cfg.train.steps:
        raise config_mod.ConfigError("--rewind-step", f"must be in [0, train.steps = {cfg.train.steps})")
    final = 1.0 - (1.0 - args.prune_fraction) ** args.rounds
    given = (raw.get("sparsity") or {}).get("sparsity")
    if given is not None and abs(float(given) - final) > 1e-3:
        raise config_mod.ConfigError("sparsity.sparsity", f"is {given}, but {args.rounds} rounds pruning "
                                     f"{args.prune_fraction} of the remaining weights end at {final:.4f}; set it to "
                                     "that or remove it")
    if cfg.sparsity.pattern != "unstructured":
        raise config_mod.ConfigError("sparsity.pattern", "the lottery prunes unstructured magnitudes")


def prune_by_magnitude(weights: dict, masks: dict, fraction: float, global_selection: bool) -> dict:
    """Prune ``fraction`` of the remaining (masked-in) weights with the smallest |w|: over all layers together
    (``global_selection``) or per layer. Ties broken by position (the selector's order); masks are whole tensors."""
    from dist_sparse.masks.select import LocalSelector, Piece

    names = sorted(masks)
    pieces = [Piece(weights[n].reshape(-1).abs().float(), masks[n].reshape(-1), 0 if global_selection else i, i, 0)
              for i, n in enumerate(names)]
    active = {n: int(masks[n].sum()) for n in names}
    if global_selection:
        keep = {0: sum(active.values()) - int(round(fraction * sum(active.values())))}
    else:
        keep = {i: active[n] - int(round(fraction * active[n])) for i, n in enumerate(names)}
    kept = LocalSelector().topk(pieces, keep)
    return {n: k.reshape(masks[n].shape) for n, k in zip(names, kept)}


def _final_state(run: Path, cfg) -> tuple:
    """The round's final weights and masks (all-ones for the dense round) of the sparsified parameters."""
    from safetensors.torch import load_file

    from dist_sparse.masks.io import load_masks

    weights = load_file(str(run / "final" / "model.safetensors"))
    masks_file = run / "final" / "sparsity_masks.safetensors"
    if masks_file.exists():
        return weights, load_masks(run / "final")
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_sparse.integration.hf import sparsifiable_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "final"))
    names = sparsifiable_parameters(model, cfg.sparsity.params, cfg.sparsity.exclude)
    return weights, {n: torch.ones(weights[n].shape, dtype=torch.bool) for n in names}


def _train(args, extra: list, run: Path, resume=None, rewind=None) -> None:
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "train", args.config]
    for o in (*args.overrides, *extra, f"train.output_dir={run}"):
        cmd += ["--set", o]
    if args.nproc:
        cmd += ["--nproc", str(args.nproc)]
    if resume:
        cmd += ["--resume", resume]
    if rewind:
        cmd += ["--rewind", str(rewind)]
    proc = subprocess.run(cmd, env=dict(os.environ))
    if proc.returncode != 0:
        raise DistSparseError(f"training {run} exited with {proc.returncode}; run the same command again to resume")


def _run_round(args, cfg, root: Path, name: str, extra: list, rewind=None) -> dict:
    """Train one run directory to its end (resuming it if interrupted); returns its summary."""
    from dist_sparse import checkpoint

    run = root / name
    summary = run / "summary.json"
    if not summary.exists():
        committed = checkpoint.committed_checkpoints(run / "checkpoints")
        _train(args, extra, run, resume="auto" if committed else None, rewind=None if committed else rewind)
    return json.loads(summary.read_text())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        raw = config_mod.apply_overrides(config_mod.read_file(args.config), args.overrides)
        cfg = config_mod.from_dict(raw)
        _check(args, cfg, raw)
        return _lottery(args, cfg)
    except DistSparseError as exc:
        print(f"dist-sparse lottery: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, config_mod.ConfigError) else 1


def _lottery(args, cfg) -> int:
    from dist_sparse import checkpoint
    from dist_sparse.masks.io import save_masks

    root = Path(cfg.train.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    k = args.rewind_step
    report = {"rounds": args.rounds, "prune_fraction": args.prune_fraction, "rewind_step": k, "round": []}
    dense = ["sparsity.method=none", "sparsity.sparsity=0.0"]
    if k:  # the state of step K is what the rounds rewind to
        dense.append(f"train.save_interval={k}")
    summaries = [_run_round(args, cfg, root, "round-00", dense)]
    rewind_to = checkpoint.step_dir(root / "round-00" / "checkpoints", k) if k else None
    for r in range(1, args.rounds + 1):
        report["round"] = _rounds(root, summaries)
        write_json_atomic(root / "lottery.json", report)
        mask_dir = root / f"masks-round-{r:02d}"
        if not (mask_dir / "sparsity_masks.safetensors").exists():
            weights, masks = _final_state(root / f"round-{r - 1:02d}", cfg)
            save_masks(mask_dir, prune_by_magnitude(weights, masks, args.prune_fraction,
                                                    cfg.sparsity.distribution == "global"))
        extra = ["sparsity.method=static", f"sparsity.init_masks={mask_dir}",
                 f"sparsity.sparsity={1 - (1 - args.prune_fraction) ** r:.6f}"]
        summaries.append(_run_round(args, cfg, root, f"round-{r:02d}", extra, rewind=rewind_to))
    report["round"] = _rounds(root, summaries)
    if args.control == "reinit":
        seed = cfg.train.seed + CONTROL_SEED_OFFSET
        final_masks = root / f"masks-round-{args.rounds:02d}"
        s = _run_round(args, cfg, root, "control-reinit",
                       ["sparsity.method=static", f"sparsity.init_masks={final_masks}", f"train.seed={seed}",
                        f"sparsity.sparsity={1 - (1 - args.prune_fraction) ** args.rounds:.6f}"])
        report["control"] = {"kind": "reinit", "seed": seed, "dir": "control-reinit",
                             "sparsity": s["achieved_sparsity"], "val_loss": s["final_val_loss"]}
    write_json_atomic(root / "lottery.json", report)
    print(json.dumps(report))
    return 0


def _rounds(root: Path, summaries: list) -> list:
    return [{"round": i, "sparsity": s["achieved_sparsity"], "val_loss": s["final_val_loss"], "dir": f"round-{i:02d}"}
            for i, s in enumerate(summaries)]
