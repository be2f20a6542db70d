"""Block-sparse attention vs dense attention, forward + backward, all ratios measured in one process.

CPU: dist_sparse's CPU path vs ``torch.nn.functional.scaled_dot_product_attention`` (dense) at seq 4096, 8 heads,
head_dim 64, block 64, batch 1, fp32, with a BigBird layout of about 10% density; non-causal (both sides non-causal)
and causal (both sides causal; dense causal SDPA already skips half the work, so the ideal ratio halves).

GPU (only with CUDA): the Triton kernels vs SDPA (flash) and FlexAttention with the same block mask, bf16, seq 16k.
Without CUDA the section says that no GPU was available instead of giving numbers.

Run from the repository root, serialised with other benchmarks:
    flock /tmp/dist_sparse_bench.lock .venv/bin/python bench/bench_attention.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, gpu_unavailable, machine_line, write_section  # noqa: E402
from dist_sparse.attention import bigbird_layout, block_sparse_attention, layout_density  # noqa: E402


def _median_seconds(fn, reps: int, warmup: int = 1, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def cpu_section(args) -> str:
    seq, heads, dim, bs = args.seq, args.heads, args.head_dim, args.block
    nb = seq // bs
    q, k, v = _qkv(1, heads, seq, dim, torch.float32, "cpu")
    grad = torch.randn_like(q)
    rows = []
    for causal in (False, True):
        layout = _layout(nb, causal, heads)
        sparse = lambda q, k, v, lay=layout, c=causal: block_sparse_attention(q, k, v, lay, bs, causal=c,
                                                                              implementation="cpu")
        dense = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)
        t = {}
        for name, attn in (("sparse", sparse), ("dense", dense)):
            t[name, "fb"] = _median_seconds(_fwd_bwd(attn, q, k, v, grad), args.reps)
            t[name, "f"] = _median_seconds(_forward(attn, q, k, v), args.reps)
        rows.append((causal, layout_density(layout), t))
        print(f"causal={causal}: " + ", ".join(f"{n}/{p} {s * 1e3:.0f} ms" for (n, p), s in t.items()), flush=True)

    lines = [
        "## Block-sparse attention",
        "",
        f"Command: `{command_line()}` (run under `flock /tmp/dist_sparse_bench.lock`)",
        "",
        f"Machine: {machine_line()}; torch threads: {torch.get_num_threads()}; load average (1 min) when the CPU "
        f"section finished: {os.getloadavg()[0]:.1f} (other jobs share this machine; wall-clock ratios move with it)",
        "",
        f"### CPU: batch 1, {heads} heads, seq {seq}, head_dim {dim}, block {bs}, fp32",
        "",
        "dist_sparse CPU path (`implementation=\"cpu\"`) vs dense `torch.nn.functional.scaled_dot_product_attention`, "
        f"median of {args.reps} runs after a warm-up, both measured in this process. Layout: BigBird (window 1, "
        "1 global block, random blocks); density = active blocks / all blocks of the full grid.",
        "",
        "| attention | layout density | sparse fwd+bwd | dense SDPA fwd+bwd | speed-up | sparse fwd | dense fwd "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for causal, density, t in rows:
        lines.append(
            f"| {'causal' if causal else 'non-causal'} | {density:.1%} | {t['sparse', 'fb'] * 1e3:.0f} ms "
            f"| {t['dense', 'fb'] * 1e3:.0f} ms | **{t['dense', 'fb'] / t['sparse', 'fb']:.1f}x** "
            f"| {t['sparse', 'f'] * 1e3:.0f} ms | {t['dense', 'f'] * 1e3:.0f} ms "
            f"| {t['dense', 'f'] / t['sparse', 'f']:.1f}x |"
        )
    lines += [
        "",
        "Causal rows: dense causal SDPA skips the upper triangle, so at the same share of the full grid the sparse "
        "path saves about half as much; the non-causal row is the like-for-like 10% comparison.",
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
        t = {name: _median_seconds(_fwd_bwd(fn, q, k, v, grad), args.reps, warmup=3, sync=sync)
             for name, fn in impls.items()}
        # Same answer as FlexAttention with the same mask (bf16 tolerance), so the timings compare equal work.
        with torch.no_grad():
            diff = (impls["sparse"](q, k, v).float() - impls["flex"](q, k, v).float()).abs().max().item()
        rows.append((causal, layout_density(layout), t, diff))
        print(f"GPU causal={causal}: " + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in t.items()), flush=True)
    lines = [
        head + f", block {bs} ({torch.cuda.get_device_name(0)})",
        "",
        f"Forward+backward, median of {args.reps} runs after 3 warm-ups (CUDA-synchronised). FlexAttention is "
        "`torch.compile`d and uses a BlockMask built from the same layout.",
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
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    args = parser.parse_args(argv)
    text = cpu_section(args) + "\n\n" + gpu_section(args)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('40_attention', text)}")


if __name__ == "__main__":
    main()
