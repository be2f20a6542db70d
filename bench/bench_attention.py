"""Block-sparse attention vs dense attention, forward + backward, all ratios measured in one process.

CPU: dist_sparse's CPU path vs ``torch.nn.functional.scaled_dot_product_attention`` (dense) at seq 4096, 8 heads,
head_dim 64, block 64, batch 1, fp32, on layouts of about 10% density: BigBird, local window + global blocks at
several windows and global counts (non-causal), and BigBird, a causal sliding window and local + global (causal;
dense causal SDPA already skips half the work, so the ideal ratio halves). Each layout alternates with its dense
baseline run by run.

GPU (only with CUDA): the Triton kernels vs SDPA (flash) and FlexAttention with the same block mask, bf16, seq 16k.
Without CUDA the section says that no GPU was available instead of giving numbers.

Resumable: each finished CPU group (the layouts of one causality with their dense baseline, at one shape and
repetition count) is kept in ``bench/work/attention/results.json`` and reused by the next run with the same
config, which the section says (``--fresh`` starts over). Run from the repository root, serialised with other
benchmarks:
    flock /tmp/dist_sparse_bench.lock .venv/bin/python bench/bench_attention.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    allocator_line,
    command_line,
    gpu_unavailable,
    interleaved,
    machine_line,
    reused_line,
    write_section,
)
from dist_sparse.attention import (  # noqa: E402
    bigbird_layout,
    block_sparse_attention,
    global_layout,
    layout_density,
    local_layout,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "attention"


def _qkv(batch, heads, seq, dim, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=gen, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


def _fwd_bwd(attn, q, k, v, grad):
    def step():
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(grad)

    return step


def _forward(attn, q, k, v):
    def step():
        with torch.no_grad():
            attn(q, k, v)

    return step


def _layout(nb: int, causal: bool, heads: int):
    # BigBird: 3-block window + 1 global block + random blocks; 2 random (non-causal) or 4 random (causal, drawn from
    # the past only) give ~10% of the full block grid at 64 blocks per side.
    return bigbird_layout(nb, window=1, num_global=1, num_random=4 if causal else 2, num_heads=heads, causal=causal)


def _local_global(nb: int, window: int, n_global: int, causal: bool):
    # what a new user would write: a sliding window plus the first blocks as global (rows attend everywhere, every
    # row attends them); at 64 blocks per side, (2 * window + 1) + 2 * n_global ~ 7 blocks per row is ~10%
    lay = local_layout(nb, window, causal=causal)
    return lay | global_layout(nb, list(range(n_global)), causal=causal) if n_global else lay


def cpu_layouts(nb: int, heads: int) -> list:
    """(causal, name, layout) of every CPU row: BigBird, local + global at several windows and global counts, and
    a causal sliding window, all near 10% of the full block grid."""
    rows = [(False, "BigBird (window 1, 1 global, 2 random)", _layout(nb, False, heads))]
    rows += [(False, f"local window {w} + {g} global", _local_global(nb, w, g, False))
             for w, g in ((2, 1), (1, 2), (0, 3), (3, 0))]
    rows += [(True, "BigBird (window 1, 1 global, 4 random)", _layout(nb, True, heads)),
             (True, "causal sliding window 6", local_layout(nb, 6, causal=True)),
             (True, "local window 4 + 1 global", _local_global(nb, 4, 1, True))]
    return rows


def cpu_section(args) -> str:
    seq, heads, dim, bs = args.seq, args.heads, args.head_dim, args.block
    nb = seq // bs
    q, k, v = _qkv(1, heads, seq, dim, torch.float32, "cpu")
    grad = torch.randn_like(q)
    layouts = cpu_layouts(nb, heads)
    results, reused, loads = [], [], []
    path = WORK / "results.json"
    done = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    allocator = allocator_line()  # before the first run: dense and sparse share it
    for causal in (False, True):
        mine = [(name, lay) for c, name, lay in layouts if c == causal]
        key = (f"cpu/{'causal' if causal else 'non-causal'}/seq{seq}/heads{heads}/dim{dim}/block{bs}/reps{args.reps}"
               f"/threads{torch.get_num_threads()}/" + ",".join(name for name, _ in mine))
        if key in done:
            reused.append(f"{'causal' if causal else 'non-causal'} layouts")
            loads.append(tuple(done[key]["load"]))
            results += [(causal, *row) for row in done[key]["rows"]]
            continue
        load_before = os.getloadavg()[0]
        dense = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
        sparse = {name: (lambda q, k, v, lay=lay, c=causal: block_sparse_attention(q, k, v, lay, bs, causal=c,
                                                                                   implementation="cpu"))
                  for name, lay in mine}
        # every layout alternates with the dense baseline of its causality, run by run
        fb = interleaved({"dense": _fwd_bwd(dense, q, k, v, grad),
                          **{n: _fwd_bwd(fn, q, k, v, grad) for n, fn in sparse.items()}}, 1, args.reps)
        fw = interleaved({"dense": _forward(dense, q, k, v), **{n: _forward(fn, q, k, v) for n, fn in sparse.items()}},
                         1, args.reps)
        rows = [(name, layout_density(lay), fb[name], fb["dense"], fw[name], fw["dense"]) for name, lay in mine]
        for name, _, sfb, dfb, *_ in rows:
            print(f"causal={causal} {name}: sparse {sfb * 1e3:.0f} ms, dense {dfb * 1e3:.0f} ms ({dfb / sfb:.1f}x)",
                  flush=True)
        results += [(causal, *row) for row in rows]
        loads.append((load_before, os.getloadavg()[0]))
        done[key] = {"rows": rows, "load": loads[-1]}
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, path)

    lines = [
        "## Block-sparse attention",
        "",
        f"Command: `{command_line()}` (run under `flock /tmp/dist_sparse_bench.lock`)",
        "",
        f"Machine: {machine_line()}; torch threads: {torch.get_num_threads()}; load average (1 min) before -> after "
        "each group (non-causal, causal): " + ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in loads)
        + " (other jobs share this machine; wall-clock ratios move with it)",
        "",
        allocator,
        "",
        reused_line(reused),
        "",
        f"### CPU: batch 1, {heads} heads, seq {seq}, head_dim {dim}, block {bs}, fp32",
        "",
        "dist_sparse CPU path (`implementation=\"cpu\"`) vs dense `torch.nn.functional.scaled_dot_product_attention`, "
        f"median of {args.reps} runs after a warm-up, all measured in this process; the layouts of one causality "
        "alternate with their dense baseline run by run. Density = active blocks / all blocks of the full grid. "
        "Local + global: a sliding window of w blocks each side plus the first g blocks global (their rows attend "
        "everywhere, every row attends them).",
        "",
        "| attention | layout | density | sparse fwd+bwd | dense SDPA fwd+bwd | speed-up | sparse fwd | dense fwd "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for causal, name, density, sfb, dfb, sf, df in results:
        lines.append(
            f"| {'causal' if causal else 'non-causal'} | {name} | {density:.1%} | {sfb * 1e3:.0f} ms "
            f"| {dfb * 1e3:.0f} ms | **{dfb / sfb:.1f}x** | {sf * 1e3:.0f} ms | {df * 1e3:.0f} ms | {df / sf:.1f}x |")
    lines += [
        "",
        "Causal rows compare with causal SDPA, which already skips the upper triangle, so at the same share of the "
        "full grid the sparse path saves about half as much. Targets: at least 5x non-causal on BigBird and on "
        "local + global near 10%, at least 3.5x causal.",
    ]
    return "\n".join(lines)


def gpu_section(args) -> str:
    head = f"### GPU: bf16, batch 1, {args.gpu_heads} heads, seq {args.gpu_seq}, head_dim {args.head_dim}"
    import dist_sparse.kernels.block_sparse_attn as kbsa

    skipped = gpu_unavailable(head, kbsa)
    if skipped is not None:
        return skipped
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq, heads, dim, bs = args.gpu_seq, args.gpu_heads, args.head_dim, args.gpu_block
    nb = seq // bs
    q, k, v = _qkv(1, heads, seq, dim, torch.bfloat16, "cuda")
    grad = torch.randn_like(q)
    flex = torch.compile(flex_attention, dynamic=False)
    sync = torch.cuda.synchronize
    rows = []
    for causal in (False, True):
        layout = _layout(nb, causal, heads).cuda()

        def mask_mod(b, h, q_idx, kv_idx, lay=layout, c=causal):
            allowed = lay[h, q_idx // bs, kv_idx // bs]
            return allowed & (q_idx >= kv_idx) if c else allowed

        block_mask = create_block_mask(mask_mod, 1, heads, seq, seq, device="cuda", BLOCK_SIZE=bs)

        def flash(q, k, v, c=causal):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=c)

        impls = {
            "sparse": lambda q, k, v, lay=layout, c=causal: block_sparse_attention(q, k, v, lay, bs, causal=c,
                                                                                   implementation="triton"),
            "sdpa_flash": flash,
            "flex": lambda q, k, v, bm=block_mask: flex(q, k, v, block_mask=bm),
        }
        t = interleaved({name: _fwd_bwd(fn, q, k, v, grad) for name, fn in impls.items()}, 1, args.reps, sync, 3)
        # Same answer as FlexAttention with the same mask (bf16 tolerance), so the timings compare equal work.
        with torch.no_grad():
            diff = (impls["sparse"](q, k, v).float() - impls["flex"](q, k, v).float()).abs().max().item()
        rows.append((causal, layout_density(layout), t, diff))
        print(f"GPU causal={causal}: " + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in t.items()), flush=True)
    lines = [
        head + f", block {bs} ({torch.cuda.get_device_name(0)})",
        "",
        f"Forward+backward, median of {args.reps} alternating runs after 3 warm-ups each (CUDA-synchronised). "
        "FlexAttention is `torch.compile`d and uses a BlockMask built from the same layout.",
        "",
        "| attention | density | block-sparse (Triton) | SDPA flash | FlexAttention | vs flash | vs Flex "
        "| max abs diff vs Flex |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for causal, density, t, diff in rows:
        lines.append(
            f"| {'causal' if causal else 'non-causal'} | {density:.1%} | {t['sparse'] * 1e3:.2f} ms "
            f"| {t['sdpa_flash'] * 1e3:.2f} ms | {t['flex'] * 1e3:.2f} ms | {t['sdpa_flash'] / t['sparse']:.1f}x "
            f"| {t['flex'] / t['sparse']:.2f}x | {diff:.3g} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gpu-seq", type=int, default=16384)
    parser.add_argument("--gpu-heads", type=int, default=16)
    parser.add_argument("--gpu-block", type=int, default=128)
    parser.add_argument("--fresh", action="store_true", help="forget the CPU results of earlier runs")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (make gpu-check)")
    parser.add_argument("--out", type=Path, default=None, help="write the section here instead of bench/results")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    text = gpu_section(args) if args.gpu_only else cpu_section(args) + "\n\n" + gpu_section(args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "40_attention.md").write_text(text + "\n")
    elif not args.no_write:
        print(f"wrote {write_section('40_attention', text)}")


if __name__ == "__main__":
    main()
