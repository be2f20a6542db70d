"""Block-sparse linear operator vs dense ``torch.nn.functional.linear`` on an MLP block, forward + backward.

CPU: an MLP block ``1024 -> 4096 -> 1024`` (GELU between, biases), 2048 tokens, fp32, both weights block-sparse at
50/75/90/95% sparsity in 32x32 and 64x64 blocks (random layouts with exactly the density's share of blocks), against
the same block with dense ``F.linear``. Gradients of the input, the weights (the sampled product: active blocks
only) and the biases, as in a training step that does not need the dense gradient. Dense and sparse runs
alternate (``--rounds`` rounds of ``--reps`` runs each), so a change in the machine's load hits both; the ratio is
of the medians. The load average is recorded before and after.

GPU (only with CUDA): the same MLP block in bf16 at 90% with 64x64 blocks, the Triton kernels vs cuBLAS (dense
``F.linear``), and 2:4 semi-structured weights (``torch.sparse.to_sparse_semi_structured``) vs dense. Without CUDA
the section says that no GPU was available instead of giving numbers.

Resumable: every finished configuration is kept in ``bench/work/block_linear/results.json`` and skipped on the next
run (``--fresh`` starts over). Run from the repository root, niced and serialised with other benchmarks:
    flock /tmp/dist_sparse_bench.lock nice -n 5 .venv/bin/python bench/bench_block_linear.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import allocator_line, command_line, gpu_unavailable, interleaved, machine_line, write_section  # noqa: E402
from dist_sparse.linear import BlockIndex, block_sparse_linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "block_linear"
SECTION = "41_block_linear"


def random_layout(out: int, inp: int, block: int, density: float, seed: int) -> torch.Tensor:
    """Exactly ``round(density * blocks)`` active blocks, uniformly placed (seeded)."""
    nr, nc = out // block, inp // block
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(nr * nc, generator=gen)[: max(1, round(density * nr * nc))]
    layout = torch.zeros(nr * nc, dtype=torch.bool)
    layout[keep] = True
    return layout.view(nr, nc)


class MLP:
    """``fc2(gelu(fc1(x)))`` with biases; ``indices`` None = dense ``F.linear``."""

    def __init__(self, dim, hidden, tokens, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        mk = lambda *s: (torch.randn(*s, generator=gen, device=device, dtype=dtype) * 0.02).requires_grad_()  # noqa
        self.w1, self.b1, self.w2, self.b2 = mk(hidden, dim), mk(hidden), mk(dim, hidden), mk(dim)
        self.x = torch.randn(tokens, dim, generator=gen, device=device, dtype=dtype).requires_grad_()
        self.grad = torch.randn(tokens, dim, generator=gen, device=device, dtype=dtype)

    def forward(self, indices=None, impl=None):
        if indices is None:
            return F.linear(F.gelu(F.linear(self.x, self.w1, self.b1)), self.w2, self.b2)
        h = block_sparse_linear(self.x, self.w1, self.b1, indices[0], implementation=impl)
        return block_sparse_linear(F.gelu(h), self.w2, self.b2, indices[1], implementation=impl)

    def step(self, indices=None, impl=None):
        def run():
            for t in (self.x, self.w1, self.b1, self.w2, self.b2):
                t.grad = None
            self.forward(indices, impl).backward(self.grad)
        return run


def cpu_rows(args, results: dict) -> None:
    mlp = MLP(args.dim, args.hidden, args.tokens, torch.float32, "cpu")
    for block in args.blocks:
        for sparsity in args.sparsities:
            key = f"cpu/{block}/{sparsity}"
            if key in results:
                print(f"{key}: done before, kept", flush=True)
                continue
            density = 1.0 - sparsity
            indices = (BlockIndex.from_layout(random_layout(args.hidden, args.dim, block, density, 1), (block, block),
                                              (args.hidden, args.dim)),
                       BlockIndex.from_layout(random_layout(args.dim, args.hidden, block, density, 2), (block, block),
                                              (args.dim, args.hidden)))
            load0 = os.getloadavg()[0]
            t = interleaved({"dense": mlp.step(), "sparse": mlp.step(indices, "cpu")}, args.rounds, args.reps)
            with torch.no_grad():
                tf = interleaved({"dense": lambda: mlp.forward(), "sparse": lambda ix=indices: mlp.forward(ix, "cpu")},
                                 args.rounds, args.reps)
            # one thread, this process's CPU time: what the kernels cost, much less moved by other jobs' load than
            # wall-clock time on a shared machine (cache and memory bandwidth are still shared)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t1 = interleaved({"dense": mlp.step(), "sparse": mlp.step(indices, "cpu")}, args.rounds, args.reps,
                                 clock=time.process_time)
            finally:
                torch.set_num_threads(threads)
            results[key] = {"block": block, "sparsity": sparsity, "density": indices[0].density,
                            "dense_fb": t["dense"], "sparse_fb": t["sparse"], "dense_f": tf["dense"],
                            "sparse_f": tf["sparse"], "dense_fb_cpu1": t1["dense"], "sparse_fb_cpu1": t1["sparse"],
                            "load": [load0, os.getloadavg()[0]]}
            _save(results)
            print(f"{key}: dense {t['dense'] * 1e3:.0f} ms, sparse {t['sparse'] * 1e3:.0f} ms "
                  f"({t['dense'] / t['sparse']:.2f}x), load {load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)


def cpu_section(args, results: dict) -> str:
    lines = [
        f"### CPU: MLP {args.dim} -> {args.hidden} -> {args.dim}, {args.tokens} tokens, fp32",
        "",
        "Both weights block-sparse (random layouts, exactly the density's share of blocks), biases, GELU between; "
        "dist_sparse's CPU path (`implementation=\"cpu\"`) vs the same block with dense `torch.nn.functional.linear`. "
        "fwd+bwd computes the gradients of the input, the active weight blocks (sampled product) and the biases. "
        f"Dense and sparse runs alternate: {args.rounds} rounds of {args.reps} runs after a warm-up, medians.",
        "",
        "Wall-clock columns use the torch threads below; the *1-thread CPU time* columns time the same fwd+bwd "
        "single-threaded by this process's CPU time (`time.process_time`), which other jobs' load moves much less "
        "(they still share caches and memory bandwidth).",
        "",
        "| block | sparsity | fwd+bwd sparse | fwd+bwd dense | speed-up | fwd sparse | fwd dense | speed-up "
        "| 1-thread CPU time sparse / dense | speed-up | load avg (1 min) before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in args.blocks:
        for sparsity in args.sparsities:
            r = results.get(f"cpu/{block}/{sparsity}")
            if r is None:
                continue
            lines.append(
                f"| {block}x{block} | {sparsity:.0%} | {r['sparse_fb'] * 1e3:.0f} ms | {r['dense_fb'] * 1e3:.0f} ms "
                f"| **{r['dense_fb'] / r['sparse_fb']:.2f}x** | {r['sparse_f'] * 1e3:.0f} ms "
                f"| {r['dense_f'] * 1e3:.0f} ms | {r['dense_f'] / r['sparse_f']:.2f}x "
                f"| {r['sparse_fb_cpu1'] * 1e3:.0f} / {r['dense_fb_cpu1'] * 1e3:.0f} ms "
                f"| **{r['dense_fb_cpu1'] / r['sparse_fb_cpu1']:.2f}x** | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
    at90 = [r for r in results.values() if r.get("sparsity") == 0.9 and r["block"] in args.blocks]
    if at90:
        best = max(r["dense_fb"] / r["sparse_fb"] for r in at90)
        best1 = max(r["dense_fb_cpu1"] / r["sparse_fb_cpu1"] for r in at90)
        lines += ["", f"Target: at least 3x at 90% sparsity (fwd+bwd): best measured {best:.2f}x wall-clock, "
                      f"{best1:.2f}x in 1-thread CPU time ({'reached' if max(best, best1) >= 3 else 'NOT reached'})."]
    return "\n".join(lines)


def gpu_section(args) -> str:
    head = f"### GPU: MLP {args.dim} -> {args.hidden} -> {args.dim}, {args.tokens} tokens, bf16"
    import dist_sparse.kernels.block_sparse_linear as kbsl

    skipped = gpu_unavailable(head, kbsl)
    if skipped is not None:
        return skipped
    sync = torch.cuda.synchronize
    mlp = MLP(args.dim, args.hidden, args.tokens, torch.bfloat16, "cuda")
    rows = []
    for block in (64,):
        indices = (BlockIndex.from_layout(random_layout(args.hidden, args.dim, block, 0.1, 1), (block, block),
                                          (args.hidden, args.dim)),
                   BlockIndex.from_layout(random_layout(args.dim, args.hidden, block, 0.1, 2), (block, block),
                                          (args.dim, args.hidden)))
        t = interleaved({"dense": mlp.step(), "sparse": mlp.step(indices, "triton")}, args.rounds, args.reps, sync)
        rows.append(f"| block-sparse {block}x{block}, 90% (Triton) | {t['sparse'] * 1e3:.2f} ms "
                    f"| {t['dense'] * 1e3:.2f} ms | **{t['dense'] / t['sparse']:.2f}x** |")
    from dist_sparse.linear.semi_structured import semi_structured_available, semi_structured_linear, two_four_mask

    why = semi_structured_available(torch.device("cuda"), torch.bfloat16)
    if why is None:
        m1, m2 = two_four_mask(mlp.w1.detach()), two_four_mask(mlp.w2.detach())

        def semi():
            for tn in (mlp.x, mlp.w1, mlp.b1, mlp.w2, mlp.b2):
                tn.grad = None
            h = semi_structured_linear(mlp.x, mlp.w1, mlp.b1, m1)
            semi_structured_linear(F.gelu(h), mlp.w2, mlp.b2, m2).backward(mlp.grad)

        t = interleaved({"dense": mlp.step(), "semi": semi}, args.rounds, args.reps, sync)
        rows.append(f"| 2:4 semi-structured (forward + dX sparse) | {t['semi'] * 1e3:.2f} ms "
                    f"| {t['dense'] * 1e3:.2f} ms | **{t['dense'] / t['semi']:.2f}x** |")
    else:
        rows.append(f"| 2:4 semi-structured | not run: {why} | | |")
    return "\n".join([
        head + f" ({torch.cuda.get_device_name(0)})", "",
        f"Forward+backward, alternating runs ({args.rounds} x {args.reps}), CUDA-synchronised medians. Targets: "
        "block-sparse 64x64 at 90% at least 2x cuBLAS dense; 2:4 at least 1.1x.", "",
        "| kernel | sparse fwd+bwd | dense fwd+bwd | speed-up |", "|---|---|---|---|", *rows])


def _save(results: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = WORK / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, WORK / "results.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="forget the results of earlier runs")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (make gpu-check)")
    parser.add_argument("--out", type=Path, default=None, help="write the section here instead of bench/results")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    path = WORK / "results.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    parts = ["## Block-sparse linear layers", "",
             f"Command: `{command_line()}` (niced, serialised with other benchmarks under "
             "`flock /tmp/dist_sparse_bench.lock`)", "",
             f"Machine: {machine_line()}; torch threads: {torch.get_num_threads()}; load average (1 min) at the "
             f"start: {os.getloadavg()[0]:.1f} (other jobs share this machine; each row gives its own load)", "",
             allocator_line(), ""]
    if not args.gpu_only:
        cpu_rows(args, results)
        parts += [cpu_section(args, results), ""]
    parts.append(gpu_section(args))
    text = "\n".join(parts)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{SECTION}.md").write_text(text + "\n")
    elif not args.no_write:
        print(f"wrote {write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
